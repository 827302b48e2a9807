//! Steps for another architecture, under QEMU user-mode emulation.
//!
//! A step whose platform the machine cannot run natively runs through the
//! kernel's binfmt_misc when an emulator is registered there for the
//! platform's ELF header with the `F` flag (the interpreter opened at
//! registration, so it also works inside the step's root; Debian's
//! `qemu-user-static` registers so). Otherwise, as BuildKit does with its
//! `buildkit-qemu-*` binaries, the step starts through a static emulator
//! found on PATH (`qemu-ARCH-static`, `buildkit-qemu-ARCH`): it is bound
//! read-only into the step at [`EMULATOR_DEST`] and put before the step's
//! command. That route needs no change to the kernel's settings, but only
//! the first program is emulated: a program it starts of the foreign
//! architecture needs binfmt_misc (or runs in-process, as busybox applets).
//! `KILN_BINFMT=ignore` skips binfmt_misc, to use (and test) that route.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use kiln_image::Platform;

/// Where the emulator appears inside a step.
pub(crate) const EMULATOR_DEST: &str = "/dev/.kiln-qemu-emulator";

/// How a step of some platform runs here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Emulation {
    /// The machine runs it (its own architecture, or one it executes natively).
    Native,
    /// binfmt_misc runs it through a registered emulator.
    Binfmt,
    /// It starts through this static emulator binary.
    Emulator(PathBuf),
}

/// How steps for `platform` run here, or the sentence that says what to install.
/// Answers are remembered for the life of the process.
pub(crate) fn emulation(platform: &Platform) -> Result<Emulation, String> {
    static KNOWN: OnceLock<Mutex<HashMap<String, Result<Emulation, String>>>> = OnceLock::new();
    let platform = platform.normalized();
    let key = platform.to_string_form();
    let known = KNOWN.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(found) = known.lock().ok().and_then(|k| k.get(&key).cloned()) {
        return found;
    }
    let found = find(&platform);
    if let Ok(mut k) = known.lock() {
        k.insert(key, found.clone());
    }
    found
}

fn find(platform: &Platform) -> Result<Emulation, String> {
    let host = Platform::host();
    if platform.os != "linux" {
        return Err(format!(
            "steps for {} cannot run on this {} machine: only linux steps run here",
            platform.to_string_form(),
            host.to_string_form()
        ));
    }
    if native(&host, platform) {
        return Ok(Emulation::Native);
    }
    let Some(elf) = Elf::of(&platform.architecture) else {
        return Err(format!(
            "steps for {} cannot run here: kiln knows no emulator for the architecture {:?}",
            platform.to_string_form(),
            platform.architecture
        ));
    };
    let ignore_binfmt = std::env::var("KILN_BINFMT").is_ok_and(|v| v == "ignore");
    if !ignore_binfmt && binfmt_registered(Path::new("/proc/sys/fs/binfmt_misc"), &elf.header()) {
        return Ok(Emulation::Binfmt);
    }
    for name in [
        format!("qemu-{}-static", elf.qemu),
        format!("buildkit-qemu-{}", elf.qemu),
        format!("qemu-{}", elf.qemu),
    ] {
        if let Some(path) = super::runc::find_program(&name) {
            if is_static(&path) {
                return Ok(Emulation::Emulator(path));
            }
        }
    }
    Err(format!(
        "steps for {} need QEMU user-mode emulation, and this machine has none for {}: install qemu-user-static \
         (Debian, Ubuntu: apt-get install qemu-user-static; it registers itself in binfmt_misc), \
         or put a static qemu-{}-static on PATH",
        platform.to_string_form(),
        elf.qemu,
        elf.qemu
    ))
}

/// Whether the machine runs `platform`'s programs itself: its own
/// architecture, and 32-bit x86 or Arm on their 64-bit hosts.
fn native(host: &Platform, platform: &Platform) -> bool {
    match (host.architecture.as_str(), platform.architecture.as_str()) {
        (h, p) if h == p => host.variant.is_empty() || platform.variant.is_empty() || host.variant == platform.variant,
        ("amd64", "386") => true,
        ("arm64", "arm") => true,
        _ => false,
    }
}

/// What identifies an architecture's programs, and QEMU's name for it.
struct Elf {
    qemu: &'static str,
    class64: bool,
    big_endian: bool,
    machine: u16,
}

impl Elf {
    fn of(arch: &str) -> Option<Elf> {
        let (qemu, class64, big_endian, machine) = match arch {
            "amd64" => ("x86_64", true, false, 62),
            "arm64" => ("aarch64", true, false, 183),
            "arm" => ("arm", false, false, 40),
            "riscv64" => ("riscv64", true, false, 243),
            "ppc64le" => ("ppc64le", true, false, 21),
            "s390x" => ("s390x", true, true, 22),
            "386" => ("i386", false, false, 3),
            "mips64le" => ("mips64el", true, false, 8),
            "loong64" => ("loongarch64", true, false, 258),
            _ => return None,
        };
        Some(Elf {
            qemu,
            class64,
            big_endian,
            machine,
        })
    }

    /// The first 20 bytes of an executable of this architecture.
    fn header(&self) -> [u8; 20] {
        let mut h = [0u8; 20];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = if self.class64 { 2 } else { 1 };
        h[5] = if self.big_endian { 2 } else { 1 };
        h[6] = 1;
        let (kind, machine) = if self.big_endian {
            (2u16.to_be_bytes(), self.machine.to_be_bytes())
        } else {
            (2u16.to_le_bytes(), self.machine.to_le_bytes())
        };
        h[16..18].copy_from_slice(&kind);
        h[18..20].copy_from_slice(&machine);
        h
    }
}

/// Whether an enabled binfmt_misc entry under `dir` with the `F` flag
/// matches `header` (magic at offset, under its mask).
fn binfmt_registered(dir: &Path, header: &[u8]) -> bool {
    if std::fs::read_to_string(dir.join("status")).is_ok_and(|s| s.trim() != "enabled") {
        return false;
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries.flatten().any(|e| {
        let name = e.file_name();
        if name == "status" || name == "register" {
            return false;
        }
        std::fs::read_to_string(e.path()).is_ok_and(|text| entry_matches(&text, header))
    })
}

/// One binfmt_misc entry's text against an executable's header.
fn entry_matches(text: &str, header: &[u8]) -> bool {
    let mut enabled = false;
    let mut fixed = false;
    let mut offset = 0usize;
    let mut magic = None;
    let mut mask = None;
    for line in text.lines() {
        match line.split_once(' ') {
            _ if line == "enabled" => enabled = true,
            Some(("flags:", f)) => fixed = f.contains('F'),
            Some(("offset", o)) => offset = o.trim().parse().unwrap_or(usize::MAX),
            Some(("magic", m)) => magic = hex::decode(m.trim()).ok(),
            Some(("mask", m)) => mask = hex::decode(m.trim()).ok(),
            _ => {}
        }
    }
    let Some(magic) = magic else { return false };
    let mask = mask.unwrap_or_else(|| vec![0xff; magic.len()]);
    enabled
        && fixed
        && offset.checked_add(magic.len()).is_some_and(|end| end <= header.len())
        && magic
            .iter()
            .zip(mask.iter().chain(std::iter::repeat(&0xff)))
            .enumerate()
            .all(|(i, (m, k))| header[offset + i] & k == m & k)
}

/// Whether an ELF file has no program interpreter (it runs in any root).
fn is_static(path: &Path) -> bool {
    let Ok(bytes) = std::fs::read(path) else { return false };
    let Some(ident) = bytes.get(..16) else { return false };
    if &ident[..4] != b"\x7fELF" {
        return false;
    }
    let class64 = ident[4] == 2;
    let le = ident[5] == 1;
    let u16_at = |o: usize| {
        bytes.get(o..o + 2).map(|b| {
            if le {
                u16::from_le_bytes([b[0], b[1]])
            } else {
                u16::from_be_bytes([b[0], b[1]])
            }
        })
    };
    let u32_at = |o: usize| {
        bytes.get(o..o + 4).map(|b| {
            let a = [b[0], b[1], b[2], b[3]];
            if le {
                u32::from_le_bytes(a)
            } else {
                u32::from_be_bytes(a)
            }
        })
    };
    let u64_at = |o: usize| {
        bytes.get(o..o + 8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            if le {
                u64::from_le_bytes(a)
            } else {
                u64::from_be_bytes(a)
            }
        })
    };
    let (phoff, phentsize, phnum) = if class64 {
        (u64_at(32).map(|v| v as usize), u16_at(54), u16_at(56))
    } else {
        (u32_at(28).map(|v| v as usize), u16_at(42), u16_at(44))
    };
    let (Some(phoff), Some(size), Some(num)) = (phoff, phentsize, phnum) else {
        return false;
    };
    // PT_INTERP (3): a dynamic program, which would need its loader in the step.
    (0..num as usize).all(|i| {
        i.checked_mul(size as usize)
            .and_then(|o| o.checked_add(phoff))
            .and_then(u32_at)
            .is_some_and(|kind| kind != 3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binfmt_entry_matches_by_magic_mask_and_fixed_flag() {
        let arm64 = Elf::of("arm64").expect("arm64").header();
        let amd64 = Elf::of("amd64").expect("amd64").header();
        let entry = "enabled\ninterpreter /usr/bin/qemu-aarch64-static\nflags: PF\noffset 0\n\
                     magic 7f454c460201010000000000000000000200b700\n\
                     mask ffffffffffffff00fffffffffffffffffeffffff\n";
        assert!(entry_matches(entry, &arm64));
        assert!(!entry_matches(entry, &amd64), "another machine");
        assert!(
            !entry_matches(&entry.replace("PF", "P"), &arm64),
            "without F the emulator is not in the step's root"
        );
        assert!(!entry_matches(&entry.replace("enabled", "disabled"), &arm64));
        assert!(!entry_matches(&entry.replace("offset 0", "offset 19"), &arm64), "past the header");
    }

    #[test]
    fn the_host_runs_its_own_platform() {
        assert_eq!(emulation(&Platform::host()), Ok(Emulation::Native));
        assert!(emulation(&Platform::parse("windows/amd64").expect("p")).is_err());
    }

    #[test]
    fn static_programs_are_told_from_dynamic_ones() {
        // busybox-static (.ci/run installs it) has no loader; the runtime's
        // own test binary has one.
        assert!(is_static(Path::new("/bin/busybox")));
        let me = std::env::current_exe().expect("test binary");
        assert!(!is_static(&me));
        assert!(!is_static(Path::new("/etc/passwd")), "not an ELF file");
    }
}
