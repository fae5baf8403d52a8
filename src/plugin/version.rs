//! CNI specification versions: which ones we speak, and what each allows.

use std::fmt;
use std::str::FromStr;

/// A CNI specification version this plugin implements.
///
/// Ordered, so `v >= Version::V0_4_0` reads as "this version has CHECK".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Version {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl Version {
    /// Every version we accept, oldest first. VERSION prints exactly this list.
    pub const SUPPORTED: [Version; 5] =
        [Version::V0_3_0, Version::V0_3_1, Version::V0_4_0, Version::V1_0_0, Version::V1_1_0];

    /// The newest version we implement.
    pub const LATEST: Version = Version::V1_1_0;

    pub fn as_str(self) -> &'static str {
        match self {
            Version::V0_3_0 => "0.3.0",
            Version::V0_3_1 => "0.3.1",
            Version::V0_4_0 => "0.4.0",
            Version::V1_0_0 => "1.0.0",
            Version::V1_1_0 => "1.1.0",
        }
    }

    /// CHECK appeared in 0.4.0.
    pub fn has_check(self) -> bool {
        self >= Version::V0_4_0
    }

    /// STATUS and GC appeared in 1.1.0.
    pub fn has_status_and_gc(self) -> bool {
        self >= Version::V1_1_0
    }

    /// From 1.0.0 on, result `ips` entries no longer carry a `version` field.
    pub fn ips_carry_version(self) -> bool {
        self < Version::V1_0_0
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A version string we do not implement; carries the text for the error message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CNI version {} is not supported (supported: 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0)", crate::text::Quoted::new(.0))]
pub struct UnsupportedVersion(pub String);

impl FromStr for Version {
    type Err = UnsupportedVersion;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Version::SUPPORTED.into_iter().find(|v| v.as_str() == s).ok_or_else(|| UnsupportedVersion(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_supported_version_and_round_trips() {
        for v in Version::SUPPORTED {
            assert_eq!(v.as_str().parse::<Version>(), Ok(v));
        }
    }

    #[test]
    fn rejects_versions_we_do_not_implement() {
        for s in ["0.1.0", "0.2.0", "1.2.0", "", "1.0", "v1.0.0"] {
            assert!(s.parse::<Version>().is_err(), "{s} must be rejected");
        }
    }

    #[test]
    fn capabilities_follow_the_spec_history() {
        assert!(!Version::V0_3_1.has_check());
        assert!(Version::V0_4_0.has_check());
        assert!(!Version::V1_0_0.has_status_and_gc());
        assert!(Version::V1_1_0.has_status_and_gc());
        assert!(Version::V0_4_0.ips_carry_version());
        assert!(!Version::V1_0_0.ips_carry_version());
    }
}
