//! LVM2's text metadata: a tree of `name = value` assignments and `name { … }` sections.
//!
//! ```text
//! item    := NAME '=' value | NAME '{' item* '}'
//! value   := STRING | INTEGER | '[' (value (',' value)*)? ']'
//! ```
//!
//! Comments run from `#` to the end of the line. Strings are double-quoted with `\` escaping
//! the next character. Other numbers (LVM writes none in volume-group metadata) are kept as
//! their text. Parsing is bounded: nesting depth and the number of values are limited.

use crate::format::{LVM_MAX_TEXT_DEPTH, LVM_MAX_TEXT_ITEMS};
use crate::{Error, Result};

/// A value of the metadata tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Value {
    Int(i64),
    Str(String),
    List(Vec<Value>),
    Section(Vec<(String, Value)>),
}

impl Value {
    /// The member `key` of a section.
    pub(crate) fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Self::Section(items) => items.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub(crate) fn int(&self, key: &str) -> Option<i64> {
        match self.get(key) {
            Some(Self::Int(i)) => Some(*i),
            _ => None,
        }
    }

    /// A non-negative integer member.
    pub(crate) fn uint(&self, key: &str) -> Option<u64> {
        self.int(key).and_then(|i| u64::try_from(i).ok())
    }

    pub(crate) fn str(&self, key: &str) -> Option<&str> {
        match self.get(key) {
            Some(Self::Str(s)) => Some(s),
            _ => None,
        }
    }

    pub(crate) fn list(&self, key: &str) -> &[Value] {
        match self.get(key) {
            Some(Self::List(v)) => v,
            _ => &[],
        }
    }

    /// Whether the string list `key` holds `flag` (e.g. `status` holds `"VISIBLE"`).
    pub(crate) fn has_flag(&self, key: &str, flag: &str) -> bool {
        self.list(key)
            .iter()
            .any(|v| matches!(v, Self::Str(s) if s == flag))
    }

    /// The members that are sections, in order.
    pub(crate) fn sections(&self) -> impl Iterator<Item = (&str, &Value)> {
        let items: &[(String, Value)] = match self {
            Self::Section(items) => items,
            _ => &[],
        };
        items
            .iter()
            .filter(|(_, v)| matches!(v, Self::Section(_)))
            .map(|(k, v)| (k.as_str(), v))
    }
}

/// Parses a whole metadata text into its top-level section.
pub(crate) fn parse(text: &str) -> Result<Value> {
    let mut p = Parser {
        b: text.as_bytes(),
        pos: 0,
        items: 0,
    };
    let top = p.items_until(None, 0)?;
    Ok(Value::Section(top))
}

struct Parser<'a> {
    b: &'a [u8],
    pos: usize,
    items: usize,
}

impl Parser<'_> {
    fn err(&self, what: &str) -> Error {
        Error::corrupt(format!("LVM metadata at byte {}: {what}", self.pos))
    }

    fn skip_space(&mut self) {
        while let Some(&c) = self.b.get(self.pos) {
            if c == b'#' {
                while self.b.get(self.pos).is_some_and(|c| *c != b'\n') {
                    self.pos += 1;
                }
            } else if c.is_ascii_whitespace() {
                self.pos += 1;
            } else {
                break;
            }
        }
    }

    fn count(&mut self) -> Result<()> {
        self.items += 1;
        if self.items > LVM_MAX_TEXT_ITEMS {
            return Err(self.err("too many values"));
        }
        Ok(())
    }

    /// Items up to `close` (or the end of the text for the top level).
    fn items_until(&mut self, close: Option<u8>, depth: usize) -> Result<Vec<(String, Value)>> {
        if depth > LVM_MAX_TEXT_DEPTH {
            return Err(self.err("sections nested too deep"));
        }
        let mut items = Vec::new();
        loop {
            self.skip_space();
            match self.b.get(self.pos) {
                None if close.is_none() => return Ok(items),
                None => return Err(self.err("unterminated section")),
                Some(&c) if Some(c) == close => {
                    self.pos += 1;
                    return Ok(items);
                }
                Some(_) => {}
            }
            let name = self.name()?;
            self.skip_space();
            match self.b.get(self.pos) {
                Some(b'=') => {
                    self.pos += 1;
                    let v = self.value(depth)?;
                    items.push((name, v));
                }
                Some(b'{') => {
                    self.pos += 1;
                    let inner = self.items_until(Some(b'}'), depth + 1)?;
                    items.push((name, Value::Section(inner)));
                }
                _ => return Err(self.err("expected '=' or '{' after a name")),
            }
            self.count()?;
        }
    }

    fn name(&mut self) -> Result<String> {
        let start = self.pos;
        while self
            .b
            .get(self.pos)
            .is_some_and(|c| c.is_ascii_alphanumeric() || b"_.-+".contains(c))
        {
            self.pos += 1;
        }
        if start == self.pos {
            return Err(self.err("expected a name"));
        }
        Ok(String::from_utf8_lossy(&self.b[start..self.pos]).into_owned())
    }

    fn value(&mut self, depth: usize) -> Result<Value> {
        self.skip_space();
        match self.b.get(self.pos) {
            Some(b'"') => self.string(),
            Some(b'[') => {
                if depth + 1 > LVM_MAX_TEXT_DEPTH {
                    return Err(self.err("lists nested too deep"));
                }
                self.pos += 1;
                let mut v = Vec::new();
                loop {
                    self.skip_space();
                    if self.b.get(self.pos) == Some(&b']') {
                        self.pos += 1;
                        return Ok(Value::List(v));
                    }
                    if !v.is_empty() {
                        if self.b.get(self.pos) != Some(&b',') {
                            return Err(self.err("expected ',' or ']' in a list"));
                        }
                        self.pos += 1;
                    }
                    v.push(self.value(depth + 1)?);
                    self.count()?;
                }
            }
            Some(c) if c.is_ascii_digit() || *c == b'-' || *c == b'+' => {
                let start = self.pos;
                self.pos += 1;
                while self
                    .b
                    .get(self.pos)
                    .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'.')
                {
                    self.pos += 1;
                }
                let t = String::from_utf8_lossy(&self.b[start..self.pos]).into_owned();
                Ok(t.parse::<i64>().map_or(Value::Str(t), Value::Int))
            }
            _ => Err(self.err("expected a value")),
        }
    }

    fn string(&mut self) -> Result<Value> {
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            match self.b.get(self.pos) {
                None => return Err(self.err("unterminated string")),
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(Value::Str(String::from_utf8_lossy(&out).into_owned()));
                }
                Some(b'\\') => {
                    let c = *self
                        .b
                        .get(self.pos + 1)
                        .ok_or_else(|| self.err("unterminated string"))?;
                    out.push(c);
                    self.pos += 2;
                }
                Some(&c) => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sections_lists_strings_and_comments() {
        let t = r#"
            vg0 {
                id = "a-b"   # comment
                extent_size = 8192
                status = ["READ", "WRITE"]
                lv { stripes = [ "pv0", 2, "pv1", 0 ] desc = "q\"uo\\te" }
            }
            version = 1
        "#;
        let v = parse(t).unwrap();
        let vg = v.get("vg0").unwrap();
        assert_eq!(vg.str("id"), Some("a-b"));
        assert_eq!(vg.uint("extent_size"), Some(8192));
        assert!(vg.has_flag("status", "WRITE"));
        let lv = vg.get("lv").unwrap();
        assert_eq!(lv.list("stripes").len(), 4);
        assert_eq!(lv.str("desc"), Some("q\"uo\\te"));
        assert_eq!(v.int("version"), Some(1));
        assert_eq!(v.sections().count(), 1);
    }

    #[test]
    fn hostile_text_is_an_error_not_a_panic() {
        for t in [
            "a {",
            "a = ",
            "a = \"x",
            "= 1",
            "a = [1 2]",
            "a = [",
            "a b",
            "a = \"\\",
        ] {
            assert!(parse(t).is_err(), "{t:?}");
        }
        let deep = "a {".repeat(100) + &"}".repeat(100);
        assert!(parse(&deep).is_err());
        let deep = "a = ".to_string() + &"[".repeat(100);
        assert!(parse(&deep).is_err());
    }
}
