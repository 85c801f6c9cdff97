//! The qrexec service descriptor: the first bytes of every socket-service call.
//!
//! For a VM-to-VM call qrexec sends `SERVICE+ARG SOURCEVM\0` before any caller data, and
//! the two can share one read. SOURCEVM is written by dom0 and is the only identity the
//! sink trusts; ARG is the caller's and is kept only as untrusted text. This module owns
//! splitting the descriptor off the stream and validating it; it does no IO.

use std::fmt;

use thiserror::Error;

/// Longest descriptor qrexec can send (`MAX_QREXEC_CMD_LEN`), terminating NUL included.
pub const MAX_DESCRIPTOR_LEN: usize = 65_535;

/// Longest valid Qubes VM name.
pub const MAX_VM_NAME_LEN: usize = 31;

/// A parsed descriptor. `source_vm` has passed [`validate_vm_name`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub service: String,
    /// The caller-chosen argument after `+`, possibly empty. Untrusted.
    pub argument: String,
    pub source_vm: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DescriptorError {
    #[error("descriptor has no terminating NUL within {max} bytes")]
    TooLong { max: usize },
    #[error("descriptor is not valid UTF-8")]
    NotUtf8,
    #[error("descriptor {text:?} is not of the form SERVICE+ARG SOURCEVM")]
    Malformed { text: String },
    #[error("descriptor names service {service:?}, but this socket serves {expected}")]
    WrongService { service: String, expected: &'static str },
    #[error("source VM name {name:?} is invalid: {reason}")]
    InvalidVmName { name: String, reason: &'static str },
}

impl fmt::Display for Descriptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}+{} {}", self.service, self.argument, self.source_vm)
    }
}

/// Looks for the end of the descriptor in `buf`.
///
/// Returns `Ok(Some(n))` where `buf[..n]` is the descriptor including its NUL, `Ok(None)`
/// if more bytes are needed, and an error once `MAX_DESCRIPTOR_LEN` bytes hold no NUL.
pub fn find_end(buf: &[u8]) -> Result<Option<usize>, DescriptorError> {
    let window = &buf[..buf.len().min(MAX_DESCRIPTOR_LEN)];
    match window.iter().position(|&b| b == 0) {
        Some(pos) => Ok(Some(pos + 1)),
        None if buf.len() >= MAX_DESCRIPTOR_LEN => {
            Err(DescriptorError::TooLong { max: MAX_DESCRIPTOR_LEN })
        }
        None => Ok(None),
    }
}

/// Parses one descriptor (with or without its trailing NUL) and checks that it is a call
/// of `expected_service` from a validly named VM.
pub fn parse(raw: &[u8], expected_service: &'static str) -> Result<Descriptor, DescriptorError> {
    let raw = raw.strip_suffix(b"\0").unwrap_or(raw);
    let text = std::str::from_utf8(raw).map_err(|_| DescriptorError::NotUtf8)?;
    let malformed = || DescriptorError::Malformed { text: truncate_for_error(text) };

    // VM-to-VM calls carry exactly two space-separated words; dom0's four-word form
    // (`... SOURCE TYPE TARGET`) is only sent to services running in dom0.
    let mut words = text.split(' ');
    let (Some(call), Some(source_vm), None) = (words.next(), words.next(), words.next()) else {
        return Err(malformed());
    };
    let (service, argument) = call.split_once('+').ok_or_else(malformed)?;
    if service != expected_service {
        return Err(DescriptorError::WrongService {
            service: truncate_for_error(service),
            expected: expected_service,
        });
    }
    validate_vm_name(source_vm)?;
    Ok(Descriptor {
        service: service.to_owned(),
        argument: argument.to_owned(),
        source_vm: source_vm.to_owned(),
    })
}

/// Checks a VM name against the rules qubesd enforces when a VM is created.
pub fn validate_vm_name(name: &str) -> Result<(), DescriptorError> {
    let invalid =
        |reason| Err(DescriptorError::InvalidVmName { name: truncate_for_error(name), reason });
    if name.is_empty() {
        return invalid("it is empty");
    }
    if name.len() > MAX_VM_NAME_LEN {
        return invalid("it is longer than 31 characters");
    }
    let mut chars = name.chars();
    if !chars.next().is_some_and(|c| c.is_ascii_alphabetic()) {
        return invalid("it must start with a letter");
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        return invalid("only letters, digits, '_' and '-' are allowed");
    }
    if matches!(name, "Domain-0" | "none" | "default") {
        return invalid("it is reserved by Qubes");
    }
    if name.ends_with("-dm") {
        return invalid("names ending in -dm are reserved for device models");
    }
    Ok(())
}

/// Keeps hostile text in error messages short; escaping happens where it is displayed.
fn truncate_for_error(text: &str) -> String {
    const MAX: usize = 80;
    if text.len() <= MAX {
        return text.to_owned();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVC: &str = "qlog.Ingest";

    #[test]
    fn parses_vm_to_vm_descriptor_with_and_without_argument() {
        let d = parse(b"qlog.Ingest+ sd-app\0", SVC).unwrap();
        assert_eq!((d.argument.as_str(), d.source_vm.as_str()), ("", "sd-app"));
        let d = parse(b"qlog.Ingest+journal sd-app", SVC).unwrap();
        assert_eq!(d.argument, "journal");
    }

    #[test]
    fn splits_descriptor_sharing_a_read_with_data() {
        let buf = b"qlog.Ingest+ vm-a\0\x00\x00\x00\x05hello";
        let end = find_end(buf).unwrap().unwrap();
        assert_eq!(&buf[..end], b"qlog.Ingest+ vm-a\0");
        assert!(find_end(b"qlog.Ingest+ vm").unwrap().is_none());
    }

    #[test]
    fn rejects_descriptor_without_nul_at_the_bound() {
        let long = vec![b'a'; MAX_DESCRIPTOR_LEN];
        assert!(matches!(find_end(&long), Err(DescriptorError::TooLong { .. })));
        let short = vec![b'a'; MAX_DESCRIPTOR_LEN - 1];
        assert_eq!(find_end(&short), Ok(None));
    }

    #[test]
    fn rejects_wrong_service_missing_plus_and_extra_words() {
        assert!(matches!(parse(b"qlog.Other+ vm", SVC), Err(DescriptorError::WrongService { .. })));
        assert!(matches!(parse(b"qlog.Ingest vm", SVC), Err(DescriptorError::Malformed { .. })));
        assert!(matches!(
            parse(b"qlog.Ingest+ vm name keyword", SVC),
            Err(DescriptorError::Malformed { .. })
        ));
        assert!(matches!(parse(b"\xff\xfe", SVC), Err(DescriptorError::NotUtf8)));
    }

    #[test]
    fn enforces_qubes_vm_name_rules() {
        for ok in ["dom0", "sd-app", "a", "A_b-9", "abcdefghijklmnopqrstuvwxyz01234"] {
            assert!(validate_vm_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1vm",
            "-vm",
            "vm.x",
            "vm name",
            "abcdefghijklmnopqrstuvwxyz012345",
            "Domain-0",
            "none",
            "default",
            "sys-net-dm",
            "vm\u{e9}",
        ] {
            assert!(validate_vm_name(bad).is_err(), "{bad:?}");
        }
    }
}
