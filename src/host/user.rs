//! Users on the command line: a UID, a UID range, or a user name looked up in the host's user
//! database.
//!
//! Parsing is split in two. [`User`] and [`Users`] are what a flag says, checked without I/O while
//! the command line is parsed; `resolve` then looks a name up. Text made only of digits is
//! a UID and is never looked up (names start with a letter or `_`), so no name can stand in for a
//! UID.
//!
//! Names are resolved with `getpwnam_r(3)`, that is through glibc's name service switch: the same
//! answer `id -u NAME` gives, including users from LDAP or SSSD and systemd's dynamic users, which
//! reading `/etc/passwd` ourselves would miss (and `/etc/passwd` has corner cases — `+` NIS lines,
//! comments — that NSS already handles).

use std::ffi::CString;
use std::fmt;
use std::io;

use thiserror::Error;

use crate::core::redirect::{UidRange, ValueError, parse_uid, parse_uid_range};
use crate::text::Quoted;

/// One user as written on the command line (`--proxy-uid`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum User {
    Uid(u32),
    /// A user name, to be looked up.
    Name(String),
}

/// Users as written on the command line (`--exclude-uid`): also a `first-last` range of UIDs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Users {
    Uids(UidRange),
    /// A user name, to be looked up.
    Name(String),
}

/// A flag's value is neither a UID (or range) nor something a user name can be.
#[derive(Debug, Error)]
pub enum BadUser {
    #[error(transparent)]
    Uid(#[from] ValueError),
    #[error("{0} is neither a UID nor a user name (names start with a letter or _)")]
    Name(Quoted),
}

/// A user name could not be turned into a UID.
#[derive(Debug, Error)]
pub enum UserError {
    #[error("no user named {0} in this host's user database (give the numeric UID instead)")]
    Unknown(Quoted),
    #[error("cannot look up user {name}")]
    Lookup {
        name: Quoted,
        #[source]
        source: io::Error,
    },
    #[error("user {name} has UID {uid}, which is not a valid UID")]
    Invalid { name: Quoted, uid: u32 },
}

impl fmt::Display for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            User::Uid(u) => write!(f, "{u}"),
            User::Name(n) => f.write_str(n),
        }
    }
}

impl fmt::Display for Users {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Users::Uids(r) => write!(f, "{r}"),
            Users::Name(n) => f.write_str(n),
        }
    }
}

impl User {
    /// A UID or a user name; no lookup yet.
    pub fn parse(s: &str) -> Result<User, BadUser> {
        if s.starts_with(|c: char| c.is_ascii_digit()) {
            return Ok(parse_uid(s, "UID").map(User::Uid)?);
        }
        name(s).map(User::Name)
    }

    /// The UID, looking a name up in the host's user database.
    pub fn resolve(&self) -> Result<u32, UserError> {
        match self {
            User::Uid(u) => Ok(*u),
            User::Name(n) => uid_of(n),
        }
    }
}

impl Users {
    /// A UID, a `first-last` range of UIDs, or a user name; no lookup yet.
    pub fn parse(s: &str) -> Result<Users, BadUser> {
        if s.starts_with(|c: char| c.is_ascii_digit()) {
            return Ok(parse_uid_range(s, "UID").map(Users::Uids)?);
        }
        name(s).map(Users::Name)
    }

    /// The UIDs, looking a name up in the host's user database.
    pub fn resolve(&self) -> Result<UidRange, UserError> {
        match self {
            Users::Uids(r) => Ok(*r),
            Users::Name(n) => uid_of(n).map(UidRange::single),
        }
    }
}

/// Accepts what user names are made of: a letter or `_`, then letters, digits and `_ . - @`, and
/// an optional trailing `$` (Debian's and systemd's rules, with `@` for directory users). Anything
/// else cannot be a name and is refused before any lookup.
fn name(s: &str) -> Result<String, BadUser> {
    let body = s.strip_suffix('$').unwrap_or(s);
    let ok = s.len() <= 256
        && body.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && body.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b'@'));
    if ok { Ok(s.to_owned()) } else { Err(BadUser::Name(Quoted::new(s))) }
}

/// The UID of the user called `name`.
pub fn uid_of(name: &str) -> Result<u32, UserError> {
    let quoted = || Quoted::new(name);
    let c_name = CString::new(name).map_err(|_| UserError::Unknown(quoted()))?;
    let mut buf = vec![0u8; 1024];
    loop {
        // Safety: `passwd` is plain data; an all-zero value is valid and getpwnam_r overwrites it.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // Safety: every pointer refers to a live local for the duration of the call, and `buf.len()`
        // is the size of the buffer the strings of `entry` are written into.
        let rc =
            unsafe { libc::getpwnam_r(c_name.as_ptr(), &mut entry, buf.as_mut_ptr().cast(), buf.len(), &mut found) };
        match rc {
            0 if found.is_null() => return Err(UserError::Unknown(quoted())),
            0 if entry.pw_uid == u32::MAX => return Err(UserError::Invalid { name: quoted(), uid: entry.pw_uid }),
            0 => return Ok(entry.pw_uid),
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 4, 0),
            // getpwnam_r(3): some name services report "no such user" with these.
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Err(UserError::Unknown(quoted())),
            e => return Err(UserError::Lookup { name: quoted(), source: io::Error::from_raw_os_error(e) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_are_uids_and_never_looked_up() {
        assert_eq!(User::parse("5995").unwrap(), User::Uid(5995));
        assert_eq!(Users::parse("1000-1999").unwrap().to_string(), "1000-1999");
        assert_eq!(Users::parse("42").unwrap(), Users::Uids(UidRange::single(42)));
        assert!(User::parse("4294967295").is_err(), "-1 is not a user");
        assert!(User::parse("1000-1999").is_err(), "one user only");
        assert_eq!(
            User::parse("a b").unwrap_err().to_string(),
            "\"a b\" is neither a UID nor a user name (names start with a letter or _)"
        );
        assert!(Users::parse("2-1").is_err());
    }

    #[test]
    fn names_are_checked_before_any_lookup() {
        assert_eq!(User::parse("envoy").unwrap(), User::Name("envoy".into()));
        assert_eq!(Users::parse("kuma-dp").unwrap(), Users::Name("kuma-dp".into()));
        assert_eq!(User::parse("host$").unwrap(), User::Name("host$".into()));
        for bad in ["", "-x", "a b", "a\nb", "a:b", "a/b", "$", "x\0", "1x", "-1"] {
            assert!(User::parse(bad).is_err(), "{bad:?} must be refused");
            assert!(Users::parse(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn names_resolve_through_the_user_database() {
        assert_eq!(User::Name("root".into()).resolve().unwrap(), 0);
        assert_eq!(Users::Name("root".into()).resolve().unwrap(), UidRange::single(0));
        let e = uid_of("no-such-user-tproxy-cni").unwrap_err();
        assert_eq!(
            e.to_string(),
            "no user named \"no-such-user-tproxy-cni\" in this host's user database (give the numeric UID instead)"
        );
    }
}
