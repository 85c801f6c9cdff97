//! Terminal safety: how bytes from a source VM are made fit to show an operator.
//!
//! Everything in an event is the VM's claim and may be hostile. For text output every
//! C0 control (other than the newline we lay out ourselves), DEL, every C1 control, and
//! every bidirectional override or isolate is replaced by a visible escape, so no ESC,
//! CSI or OSC sequence and no reordering trick reaches the terminal. Valid UTF-8 is kept
//! as it is; each invalid byte becomes `\xNN`. Values that are mostly not text are shown
//! as `[N bytes of binary data]` instead.

use std::borrow::Cow;
use std::fmt::Write;

/// True if and only if `c` would change the terminal's state or the visual order of
/// text instead of printing as itself.
fn is_unsafe(c: char) -> bool {
    matches!(c,
        '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}'
        // Bidi embeddings, overrides, isolates and marks.
        | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' | '\u{61c}'
        // Line and paragraph separators break lines behind our back.
        | '\u{2028}' | '\u{2029}'
    )
}

fn push_escape(out: &mut String, c: char) {
    match c {
        '\t' => out.push_str("\\t"),
        '\r' => out.push_str("\\r"),
        '\n' => out.push_str("\\n"),
        '\u{1b}' => out.push_str("\\e"),
        c if (c as u32) < 0x100 => {
            let _ = write!(out, "\\x{:02x}", c as u32);
        }
        c => {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
    }
}

/// True if and only if the value is better shown as a size than as escaped text: it
/// holds a NUL, or over a quarter of it is invalid UTF-8 or control bytes.
pub fn is_binary(value: &[u8]) -> bool {
    if plain(value, true) {
        return false;
    }
    if value.contains(&0) {
        return true;
    }
    let mut bad = 0usize;
    for chunk in value.utf8_chunks() {
        bad += chunk.invalid().len();
        bad += chunk.valid().chars().filter(|c| is_unsafe(*c) && *c != '\n' && *c != '\t').count();
    }
    bad * 4 > value.len()
}

/// Escapes a value for one line of output: newlines are escaped too.
pub fn escape_line(value: &[u8]) -> Cow<'_, str> {
    escape(value, false)
}

/// True if and only if every byte is printable ASCII (or a newline, if kept): nearly
/// every log value, shown as it is without looking at characters.
fn plain(value: &[u8], keep_newlines: bool) -> bool {
    value.iter().all(|&b| (0x20..0x7f).contains(&b) || (keep_newlines && b == b'\n'))
}

fn escape(value: &[u8], keep_newlines: bool) -> Cow<'_, str> {
    if plain(value, keep_newlines) {
        return Cow::Borrowed(std::str::from_utf8(value).expect("printable ASCII is UTF-8"));
    }
    let mut out = String::with_capacity(value.len());
    for chunk in value.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\n' && keep_newlines {
                out.push('\n');
            } else if is_unsafe(c) {
                push_escape(&mut out, c);
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    Cow::Owned(out)
}

/// A value as text output shows it: escaped, or its size if it is binary.
pub fn display_value(value: &[u8], keep_newlines: bool) -> Cow<'_, str> {
    if is_binary(value) {
        Cow::Owned(format!("[{} bytes of binary data]", value.len()))
    } else {
        escape(value, keep_newlines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_never_pass_through() {
        let hostile = "\u{1b}[2J\u{1b}]0;owned\u{7}\u{9b}31m ok";
        let shown = escape_line(hostile.as_bytes());
        assert!(!shown.chars().any(is_unsafe), "{shown:?}");
        assert_eq!(shown, "\\e[2J\\e]0;owned\\x07\\x9b31m ok");
    }

    #[test]
    fn bidi_overrides_are_visible() {
        let shown = escape_line("user\u{202e}txt.exe\u{2066}".as_bytes());
        assert_eq!(shown, "user\\u{202e}txt.exe\\u{2066}");
    }

    #[test]
    fn valid_utf8_is_kept_and_invalid_bytes_are_hex() {
        assert_eq!(escape_line("Grüße, 日本".as_bytes()), "Grüße, 日本");
        assert_eq!(escape_line(b"ab\xffcd"), "ab\\xffcd");
    }

    #[test]
    fn newlines_are_kept_only_when_asked() {
        assert_eq!(escape(b"a\nb\r", true), "a\nb\\r");
        assert_eq!(escape_line(b"a\nb\tc"), "a\\nb\\tc");
    }

    #[test]
    fn binary_is_recognised() {
        assert!(is_binary(b"a\0b"));
        assert!(is_binary(&[0xff, 0xfe, 0x80, 0x81, b'a']));
        assert!(!is_binary(b"mostly text \xff here"));
        assert_eq!(display_value(&[0, 1, 2], false), "[3 bytes of binary data]");
    }
}
