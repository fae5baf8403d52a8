//! Text every layer writes with: errors on one line, outside values quoted safely.
//!
//! A message the plugin prints reaches a runtime's event log, `kubectl describe` and the log file,
//! and may quote what a pod author wrote. [`chain`] folds an error and its causes into one line,
//! [`Quoted`] shows an outside value escaped and bounded, [`bounded`] cuts other text (a parser's
//! own message) to a length.

use std::fmt;

/// Joins an error and all its sources into one line: "outer: inner: innermost".
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.ends_with(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    one_line(&out)
}

/// Folds any line breaks so a message stays one line in logs and in `kubectl describe`.
pub fn one_line(s: &str) -> String {
    if s.contains(['\n', '\r']) {
        s.split(['\n', '\r']).filter(|l| !l.trim().is_empty()).collect::<Vec<_>>().join(" / ")
    } else {
        s.to_owned()
    }
}

/// A value from the outside world, printed escaped and shortened for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quoted(String);

impl Quoted {
    /// The most bytes of escaped text shown; what is cut is marked with `…`.
    pub const MAX_BYTES: usize = 64;

    pub fn new(s: &str) -> Quoted {
        let mut q = String::from("\"");
        for c in s.chars() {
            let escaped: String = c.escape_debug().collect();
            if q.len() - 1 + escaped.len() > Quoted::MAX_BYTES {
                q.push('…');
                break;
            }
            q.push_str(&escaped);
        }
        q.push('"');
        Quoted(q)
    }
}

impl fmt::Display for Quoted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `text` cut to at most `max` bytes on a character boundary, `…` marking a cut.
pub fn bounded(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end]).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_values_show_escapes_and_are_bounded() {
        assert_eq!(Quoted::new("a\nb").to_string(), r#""a\nb""#);
        assert!(Quoted::new(&"x".repeat(1000)).to_string().len() < 80);
        // Escapes count: 200 control characters are cut as short as 200 letters.
        assert!(Quoted::new(&"\u{19}".repeat(200)).to_string().len() < 80);
        assert!(Quoted::new(&"é".repeat(200)).to_string().ends_with("…\""));
    }

    #[test]
    fn bounded_text_is_cut_on_a_character_boundary() {
        assert_eq!(bounded("short", 10), "short");
        let long = "é".repeat(100);
        let cut = bounded(&long, 11);
        assert!(cut.len() <= 11 && cut.ends_with('…'), "{cut}");
    }

    #[test]
    fn a_chain_stays_one_line() {
        let e = std::io::Error::other("line one\nline two\n");
        assert_eq!(chain(&e), "line one / line two");
    }
}
