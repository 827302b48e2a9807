//! OCI platforms (`linux/amd64`, `linux/arm64/v8`).

use serde::{Deserialize, Serialize};

/// An OCI platform (`linux/amd64`, `linux/arm64/v8`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Platform {
    /// `os`.
    pub os: String,
    /// `architecture`.
    pub architecture: String,
    /// `variant`, may be empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub variant: String,
}

impl Platform {
    /// As an LLB `pb.Platform`.
    pub fn to_pb(&self) -> kiln_llb::pb::Platform {
        kiln_llb::pb::Platform {
            architecture: self.architecture.clone(),
            os: self.os.clone(),
            variant: self.variant.clone(),
            ..Default::default()
        }
    }

    /// `linux/amd64`.
    pub fn linux_amd64() -> Platform {
        Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: String::new(),
        }
    }

    /// Parses `os/arch[/variant]`.
    pub fn parse(s: &str) -> Option<Platform> {
        let mut parts = s.split('/');
        let os = parts.next().filter(|p| !p.is_empty())?.to_ascii_lowercase();
        let architecture = parts.next().filter(|p| !p.is_empty())?.to_ascii_lowercase();
        let variant = parts.next().unwrap_or("").to_string();
        if parts.next().is_some() {
            return None;
        }
        Some(Platform { os, architecture, variant })
    }

    /// The platform as OCI names it, as containerd's `platforms.Normalize`:
    /// `aarch64` is `arm64` (its `v8` implied), `x86_64` is `amd64`, `armhf`
    /// is `arm/v7`, a bare `arm` is `arm/v7`, `i386`/`i686` are `386`.
    pub fn normalized(&self) -> Platform {
        let os = self.os.to_ascii_lowercase();
        let (arch, variant) = match (self.architecture.to_ascii_lowercase().as_str(), self.variant.as_str()) {
            ("aarch64" | "arm64", "8" | "v8") => ("arm64", ""),
            ("aarch64", v) => ("arm64", v),
            ("x86_64" | "x86-64" | "amd64", "v1") => ("amd64", ""),
            ("x86_64" | "x86-64", v) => ("amd64", v),
            ("i386" | "i486" | "i586" | "i686", _) => ("386", ""),
            ("armhf", _) => ("arm", "v7"),
            ("armel", _) => ("arm", "v6"),
            ("arm", "") => ("arm", "v7"),
            ("arm", v @ ("5" | "6" | "7" | "8")) => return Platform::new(&os, "arm", &format!("v{v}")),
            (a, v) => return Platform::new(&os, a, v),
        };
        Platform::new(&os, arch, variant)
    }

    fn new(os: &str, architecture: &str, variant: &str) -> Platform {
        Platform {
            os: os.to_string(),
            architecture: architecture.to_string(),
            variant: variant.to_string(),
        }
    }

    /// The platform this program was built for (its OCI name): the build
    /// platform of a build running here.
    pub fn host() -> Platform {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        let variant = if arch == "arm" { "v7" } else { "" };
        Platform::new("linux", arch, variant)
    }

    /// `os/arch[/variant]`.
    pub fn to_string_form(&self) -> String {
        if self.variant.is_empty() {
            format!("{}/{}", self.os, self.architecture)
        } else {
            format!("{}/{}/{}", self.os, self.architecture, self.variant)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Platform;

    fn norm(s: &str) -> String {
        Platform::parse(s).expect("platform").normalized().to_string_form()
    }

    #[test]
    fn platforms_normalize_as_containerd_does() {
        assert_eq!(norm("linux/aarch64"), "linux/arm64");
        assert_eq!(norm("linux/arm64/v8"), "linux/arm64");
        assert_eq!(norm("Linux/X86_64"), "linux/amd64");
        assert_eq!(norm("linux/arm"), "linux/arm/v7");
        assert_eq!(norm("linux/armhf"), "linux/arm/v7");
        assert_eq!(norm("linux/arm/6"), "linux/arm/v6");
        assert_eq!(norm("linux/i686"), "linux/386");
        assert_eq!(norm("linux/riscv64"), "linux/riscv64");
        assert_eq!(norm("linux/amd64/v3"), "linux/amd64/v3");
    }
}
