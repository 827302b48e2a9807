//! The seccomp filter a RUN step runs under unless it is `--security=insecure`.
//!
//! BuildKit's sandbox mode gives every step Docker's default profile; this is
//! that policy, built for the step's own capabilities:
//! - a system call outside the lists below fails with EPERM;
//! - calls that only a capability makes safe (mount, unshare, setns, bpf,
//!   ptrace before 4.8, ...) are allowed only when the step holds it;
//! - without CAP_SYS_ADMIN, clone may not ask for new namespaces, and clone3
//!   (whose flags a filter cannot read) fails with ENOSYS, so C libraries
//!   fall back to clone;
//! - AF_ALG and AF_VSOCK sockets are refused, personality takes only the
//!   personas programs use (Linux, 32-bit emulation, address-space layout).
//!
//! The runtime ignores names its libseccomp does not know, and makes system
//! calls newer than the profile fail with ENOSYS rather than EPERM.

use std::collections::HashSet;
use std::sync::OnceLock;

use oci_spec::runtime::{
    Arch, Capability, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompArgBuilder, LinuxSeccompOperator, LinuxSyscall,
};
use oci_spec::OciSpecError;

/// Allowed whatever the step's capabilities (Docker's default profile, as
/// vendored by BuildKit 0.32).
const ALLOWED: &str = "\
    accept accept4 access adjtimex alarm bind brk cachestat capget capset chdir chmod chown chown32 \
    clock_adjtime clock_adjtime64 clock_getres clock_getres_time64 clock_gettime clock_gettime64 \
    clock_nanosleep clock_nanosleep_time64 close close_range connect copy_file_range creat dup dup2 dup3 \
    epoll_create epoll_create1 epoll_ctl epoll_ctl_old epoll_pwait epoll_pwait2 epoll_wait epoll_wait_old \
    eventfd eventfd2 execve execveat exit exit_group faccessat faccessat2 fadvise64 fadvise64_64 \
    fallocate fanotify_mark fchdir fchmod fchmodat fchmodat2 fchown fchown32 fchownat fcntl fcntl64 \
    fdatasync fgetxattr flistxattr flock fork fremovexattr fsetxattr fstat fstat64 fstatat64 fstatfs \
    fstatfs64 fsync ftruncate ftruncate64 futex futex_requeue futex_time64 futex_wait futex_waitv \
    futex_wake futimesat getcpu getcwd getdents getdents64 getegid getegid32 geteuid geteuid32 getgid \
    getgid32 getgroups getgroups32 getitimer getpeername getpgid getpgrp getpid getppid getpriority \
    getrandom getresgid getresgid32 getresuid getresuid32 getrlimit get_robust_list getrusage getsid \
    getsockname getsockopt get_thread_area gettid gettimeofday getuid getuid32 getxattr getxattrat \
    inotify_add_watch inotify_init inotify_init1 inotify_rm_watch io_cancel ioctl io_destroy \
    io_getevents io_pgetevents io_pgetevents_time64 ioprio_get ioprio_set io_setup io_submit ipc kill \
    landlock_add_rule landlock_create_ruleset landlock_restrict_self lchown lchown32 lgetxattr link \
    linkat listen listmount listxattr listxattrat llistxattr _llseek lremovexattr lseek lsetxattr lstat \
    lstat64 madvise map_shadow_stack membarrier memfd_create memfd_secret mincore mkdir mkdirat mknod \
    mknodat mlock mlock2 mlockall mmap mmap2 mprotect mq_getsetattr mq_notify mq_open mq_timedreceive \
    mq_timedreceive_time64 mq_timedsend mq_timedsend_time64 mq_unlink mremap mseal msgctl msgget msgrcv \
    msgsnd msync munlock munlockall munmap name_to_handle_at nanosleep newfstatat _newselect open \
    openat openat2 pause pidfd_open pidfd_send_signal pipe pipe2 pkey_alloc pkey_free pkey_mprotect \
    poll ppoll ppoll_time64 prctl pread64 preadv preadv2 prlimit64 process_mrelease pselect6 \
    pselect6_time64 pwrite64 pwritev pwritev2 read readahead readlink readlinkat readv recv recvfrom \
    recvmmsg recvmmsg_time64 recvmsg remap_file_pages removexattr removexattrat rename renameat \
    renameat2 restart_syscall riscv_hwprobe rmdir rseq rt_sigaction rt_sigpending rt_sigprocmask \
    rt_sigqueueinfo rt_sigreturn rt_sigsuspend rt_sigtimedwait rt_sigtimedwait_time64 \
    rt_tgsigqueueinfo sched_getaffinity sched_getattr sched_getparam sched_get_priority_max \
    sched_get_priority_min sched_getscheduler sched_rr_get_interval sched_rr_get_interval_time64 \
    sched_setaffinity sched_setattr sched_setparam sched_setscheduler sched_yield seccomp select semctl \
    semget semop semtimedop semtimedop_time64 send sendfile sendfile64 sendmmsg sendmsg sendto \
    setfsgid setfsgid32 setfsuid setfsuid32 setgid setgid32 setgroups setgroups32 setitimer setpgid \
    setpriority setregid setregid32 setresgid setresgid32 setresuid setresuid32 setreuid setreuid32 \
    setrlimit set_robust_list setsid setsockopt set_thread_area set_tid_address setuid setuid32 \
    setxattr setxattrat shmat shmctl shmdt shmget shutdown sigaltstack signalfd signalfd4 sigprocmask \
    sigreturn socketcall socketpair splice stat stat64 statfs statfs64 statmount statx symlink \
    symlinkat sync sync_file_range syncfs sysinfo tee tgkill time timer_create timer_delete \
    timer_getoverrun timer_gettime timer_gettime64 timer_settime timer_settime64 timerfd_create \
    timerfd_gettime timerfd_gettime64 timerfd_settime timerfd_settime64 times tkill truncate truncate64 \
    ugetrlimit umask uname unlink unlinkat uretprobe utime utimensat utimensat_time64 utimes vfork \
    vmsplice wait4 waitid waitpid write writev";

/// Allowed on kernels from 4.8, whose ptrace can no longer be used to get
/// around a seccomp filter.
const TRACING: &str = "process_vm_readv process_vm_writev ptrace";

/// Allowed only to a step holding the capability.
const BY_CAPABILITY: &[(Capability, &str)] = &[
    (Capability::DacReadSearch, "open_by_handle_at"),
    (
        Capability::SysAdmin,
        "bpf clone clone3 fanotify_init fsconfig fsmount fsopen fspick lookup_dcookie lsm_get_self_attr \
         lsm_list_modules lsm_set_self_attr mount mount_setattr move_mount open_tree perf_event_open quotactl \
         quotactl_fd setdomainname sethostname setns syslog umount umount2 unshare",
    ),
    (Capability::SysBoot, "reboot"),
    (Capability::SysChroot, "chroot"),
    (Capability::SysModule, "delete_module init_module finit_module"),
    (Capability::SysPacct, "acct"),
    (
        Capability::SysPtrace,
        "kcmp pidfd_getfd process_madvise process_vm_readv process_vm_writev ptrace",
    ),
    (Capability::SysRawio, "iopl ioperm"),
    (Capability::SysTime, "settimeofday stime clock_settime clock_settime64"),
    (Capability::SysTtyConfig, "vhangup"),
    (Capability::SysNice, "get_mempolicy mbind set_mempolicy set_mempolicy_home_node"),
    (Capability::Syslog, "syslog"),
    (Capability::Bpf, "bpf"),
    (Capability::Perfmon, "perf_event_open"),
];

/// clone's flags that make new namespaces (CLONE_NEWNS, NEWCGROUP, NEWUTS,
/// NEWIPC, NEWUSER, NEWPID, NEWNET): with none of them set, clone is a
/// fork or a thread.
const NAMESPACE_FLAGS: u64 = 0x7E02_0000;

/// Personas a step may switch to: PER_LINUX, PER_LINUX32, UNAME26,
/// UNAME26 | PER_LINUX32, and 0xffffffff (which only queries the current one).
const PERSONAS: [u64; 5] = [0x0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];

/// Socket families refused: AF_ALG (the kernel's crypto API) and AF_VSOCK.
const AF_ALG: u64 = 38;
const AF_VSOCK: u64 = 40;

/// What the filter depends on besides the step's capabilities.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Host {
    /// Rust's name for the machine's architecture (`std::env::consts::ARCH`).
    pub arch: &'static str,
    /// The running kernel's major and minor version.
    pub kernel: (u32, u32),
}

impl Host {
    /// This machine; `None` when its kernel has no seccomp (then, as with
    /// BuildKit, steps run without a filter).
    pub(crate) fn current() -> Option<Host> {
        static HOST: OnceLock<Option<Host>> = OnceLock::new();
        *HOST.get_or_init(|| {
            let status = std::fs::read_to_string("/proc/self/status").ok()?;
            if !status.lines().any(|l| l.starts_with("Seccomp:")) {
                return None;
            }
            let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
            Some(Host {
                arch: std::env::consts::ARCH,
                kernel: kernel_version(release.trim()),
            })
        })
    }
}

/// `6.1.0-18-amd64` as (6, 1); what does not parse counts as 0.
fn kernel_version(release: &str) -> (u32, u32) {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let mut next = || parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (next(), next())
}

/// The filter for a step holding `caps` (its bounding set) on `host`.
pub(crate) fn default_filter(caps: &HashSet<Capability>, host: Host) -> Result<LinuxSeccomp, OciSpecError> {
    let (architectures, arch_calls, clone_flags_arg): (Vec<Arch>, &str, usize) = match host.arch {
        // Docker's profile also lists x32, whose programs no distribution
        // ships and most kernels refuse (syscall.x32=n): each architecture
        // costs the runtime ~7 ms per step to compile. Left out, an x32
        // call is killed (SIGSYS) instead of failing with ENOSYS.
        "x86_64" => (vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86], "arch_prctl modify_ldt", 0),
        "x86" => (Vec::new(), "modify_ldt", 0),
        "aarch64" => (vec![Arch::ScmpArchAarch64, Arch::ScmpArchArm], ARM_CALLS, 0),
        "arm" => (Vec::new(), ARM_CALLS, 0),
        "riscv64" => (vec![Arch::ScmpArchRiscv64], "riscv_flush_icache", 0),
        // s390's clone takes the stack first and the flags second.
        "s390x" => (
            vec![Arch::ScmpArchS390x, Arch::ScmpArchS390],
            "s390_pci_mmio_read s390_pci_mmio_write s390_runtime_instr",
            1,
        ),
        "powerpc64" => (Vec::new(), "sync_file_range2 swapcontext", 0),
        _ => (Vec::new(), "", 0),
    };
    let mut rules = vec![allow(ALLOWED)];
    if host.kernel >= (4, 8) {
        rules.push(allow(TRACING));
    }
    // socket: any family but the two refused.
    for (op, family) in [
        (LinuxSeccompOperator::ScmpCmpLt, AF_ALG),
        (LinuxSeccompOperator::ScmpCmpEq, AF_ALG + 1),
        (LinuxSeccompOperator::ScmpCmpGt, AF_VSOCK),
    ] {
        rules.push(allow_if("socket", arg(0, op, family, None)?));
    }
    for persona in PERSONAS {
        rules.push(allow_if("personality", arg(0, LinuxSeccompOperator::ScmpCmpEq, persona, None)?));
    }
    if !arch_calls.is_empty() {
        rules.push(allow(arch_calls));
    }
    for (cap, calls) in BY_CAPABILITY {
        if caps.contains(cap) {
            rules.push(allow(calls));
        }
    }
    if !caps.contains(&Capability::SysAdmin) {
        rules.push(allow_if(
            "clone",
            arg(clone_flags_arg, LinuxSeccompOperator::ScmpCmpMaskedEq, NAMESPACE_FLAGS, Some(0))?,
        ));
        let mut clone3 = LinuxSyscall::default();
        clone3.set_names(vec!["clone3".to_string()]);
        clone3.set_action(LinuxSeccompAction::ScmpActErrno);
        clone3.set_errno_ret(Some(ENOSYS));
        rules.push(clone3);
    }
    let mut filter = LinuxSeccomp::default();
    filter.set_default_action(LinuxSeccompAction::ScmpActErrno);
    filter.set_default_errno_ret(Some(EPERM));
    filter.set_architectures((!architectures.is_empty()).then_some(architectures));
    filter.set_syscalls(Some(rules));
    Ok(filter)
}

const ARM_CALLS: &str = "arm_fadvise64_64 arm_sync_file_range sync_file_range2 breakpoint cacheflush set_tls";
const EPERM: u32 = 1;
const ENOSYS: u32 = 38;

fn allow(names: &str) -> LinuxSyscall {
    let mut rule = LinuxSyscall::default();
    rule.set_names(names.split_whitespace().map(str::to_string).collect());
    rule.set_action(LinuxSeccompAction::ScmpActAllow);
    rule
}

fn allow_if(name: &str, condition: LinuxSeccompArg) -> LinuxSyscall {
    let mut rule = allow(name);
    rule.set_args(Some(vec![condition]));
    rule
}

fn arg(index: usize, op: LinuxSeccompOperator, value: u64, value_two: Option<u64>) -> Result<LinuxSeccompArg, OciSpecError> {
    let a = LinuxSeccompArgBuilder::default().index(index).op(op).value(value);
    match value_two {
        Some(v) => a.value_two(v),
        None => a,
    }
    .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    const AMD64: Host = Host {
        arch: "x86_64",
        kernel: (6, 1),
    };

    fn default_caps() -> HashSet<Capability> {
        super::super::runc::default_capabilities()
    }

    /// Names the filter lets through unconditionally, and the rules with conditions.
    fn split(filter: &LinuxSeccomp) -> (HashSet<String>, Vec<LinuxSyscall>) {
        let mut open = HashSet::new();
        let mut conditional = Vec::new();
        for rule in filter.syscalls().clone().unwrap_or_default() {
            if rule.action() == LinuxSeccompAction::ScmpActAllow && rule.args().is_none() {
                open.extend(rule.names().iter().cloned());
            } else {
                conditional.push(rule);
            }
        }
        (open, conditional)
    }

    #[test]
    fn a_default_step_gets_no_namespace_mount_or_keyring_calls() {
        let filter = default_filter(&default_caps(), AMD64).expect("filter");
        assert_eq!(filter.default_action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(filter.default_errno_ret(), Some(EPERM));
        let (open, conditional) = split(&filter);
        for refused in [
            "unshare",
            "setns",
            "mount",
            "umount2",
            "clone",
            "clone3",
            "keyctl",
            "add_key",
            "request_key",
            "bpf",
            "userfaultfd",
            "init_module",
            "kexec_load",
            "open_by_handle_at",
            "reboot",
            "swapon",
        ] {
            assert!(!open.contains(refused), "{refused} is refused");
        }
        // What builds use every day, and the calls the step's capabilities make safe.
        for allowed in ["execve", "fork", "openat", "statx", "chroot", "ptrace", "arch_prctl", "fchmodat2"] {
            assert!(open.contains(allowed), "{allowed} is allowed");
        }
        // clone without namespace flags only; clone3 reports ENOSYS so libc falls back.
        let clone = conditional.iter().find(|r| r.names() == &["clone"]).expect("clone rule");
        let a = clone.args().clone().expect("args")[0];
        assert_eq!(
            (a.index(), a.op(), a.value(), a.value_two()),
            (0, LinuxSeccompOperator::ScmpCmpMaskedEq, NAMESPACE_FLAGS, Some(0))
        );
        let clone3 = conditional.iter().find(|r| r.names() == &["clone3"]).expect("clone3 rule");
        assert_eq!(
            (clone3.action(), clone3.errno_ret()),
            (LinuxSeccompAction::ScmpActErrno, Some(ENOSYS))
        );
        // socket: every family but AF_ALG (38) and AF_VSOCK (40).
        let families: Vec<(LinuxSeccompOperator, u64)> = conditional
            .iter()
            .filter(|r| r.names() == &["socket"])
            .map(|r| {
                let a = r.args().clone().expect("args")[0];
                (a.op(), a.value())
            })
            .collect();
        let admitted = |f: u64| {
            families.iter().any(|(op, v)| match op {
                LinuxSeccompOperator::ScmpCmpLt => f < *v,
                LinuxSeccompOperator::ScmpCmpEq => f == *v,
                LinuxSeccompOperator::ScmpCmpGt => f > *v,
                _ => false,
            })
        };
        assert!((0..64).filter(|f| !admitted(*f)).eq([AF_ALG, AF_VSOCK]), "{families:?}");
    }

    #[test]
    fn capabilities_open_their_calls() {
        let mut caps = default_caps();
        caps.insert(Capability::SysAdmin);
        caps.insert(Capability::SysPtrace);
        let (open, conditional) = split(&default_filter(&caps, AMD64).expect("filter"));
        for allowed in ["unshare", "setns", "mount", "clone", "clone3", "bpf", "kcmp"] {
            assert!(open.contains(allowed), "{allowed} with its capability");
        }
        assert!(
            !conditional.iter().any(|r| r.names().iter().any(|n| n.starts_with("clone"))),
            "no clone condition with CAP_SYS_ADMIN"
        );
        assert!(!open.contains("reboot") && !open.contains("keyctl"));
    }

    #[test]
    fn ptrace_needs_a_kernel_whose_ptrace_respects_the_filter() {
        let old = Host {
            arch: "x86_64",
            kernel: (4, 4),
        };
        let (open, _) = split(&default_filter(&default_caps(), old).expect("filter"));
        assert!(!open.contains("ptrace"));
        assert_eq!(kernel_version("6.18.44-fc-v669"), (6, 18));
        assert_eq!(kernel_version("4.8"), (4, 8));
        assert_eq!(kernel_version("garbage"), (0, 0));
    }

    #[test]
    fn architectures_and_their_own_calls() {
        let arm = Host {
            arch: "aarch64",
            kernel: (6, 1),
        };
        let filter = default_filter(&default_caps(), arm).expect("filter");
        assert_eq!(filter.architectures(), &Some(vec![Arch::ScmpArchAarch64, Arch::ScmpArchArm]));
        let (open, _) = split(&filter);
        assert!(open.contains("set_tls") && !open.contains("arch_prctl"));
        let amd = default_filter(&default_caps(), AMD64).expect("filter");
        // The names the runtime reads.
        let json = serde_json::to_value(&amd).expect("json");
        assert_eq!(json["architectures"], serde_json::json!(["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"]));
        assert_eq!(json["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(json["defaultErrnoRet"], 1);
        let s390 = Host {
            arch: "s390x",
            kernel: (6, 1),
        };
        let (_, conditional) = split(&default_filter(&default_caps(), s390).expect("filter"));
        let clone = conditional.iter().find(|r| r.names() == &["clone"]).expect("clone rule");
        assert_eq!(clone.args().clone().expect("args")[0].index(), 1, "s390's flags come second");
    }

    #[test]
    fn every_name_is_listed_once_per_rule() {
        let mut seen = HashSet::new();
        for name in ALLOWED.split_whitespace() {
            assert!(seen.insert(name), "{name} twice");
            assert!(
                name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{name}"
            );
        }
        assert_eq!(seen.len(), 361);
    }
}
