//! PostgreSQL array literals (`array_out` text form) → nested elements.
//!
//! `{1,2,NULL}`, `{"a b","x\"y"}`, `{{1,2},{3,4}}` and `[0:1]={7,8}` (explicit bounds, which
//! are dropped: JSON arrays start at zero). Elements stay text; converting them to JSON by the
//! element type is the caller's job.

/// A parsed array literal: nested lists whose leaves are an element's text or NULL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArrayNode {
    /// One dimension level.
    List(Vec<ArrayNode>),
    /// A leaf: `None` is SQL NULL.
    Elem(Option<String>),
}

/// The text is not an array literal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed array literal at byte {position}: {reason}")]
pub struct ArrayParseError {
    /// Byte offset of the problem.
    pub position: usize,
    /// What was expected.
    pub reason: &'static str,
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    delimiter: u8,
}

impl Parser<'_> {
    fn err(&self, reason: &'static str) -> ArrayParseError {
        ArrayParseError {
            position: self.pos,
            reason,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn list(&mut self) -> Result<ArrayNode, ArrayParseError> {
        if self.peek() != Some(b'{') {
            return Err(self.err("expected '{'"));
        }
        self.pos += 1;
        let mut items = Vec::new();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(ArrayNode::List(items));
        }
        loop {
            let item = match self.peek() {
                Some(b'{') => self.list()?,
                Some(b'"') => ArrayNode::Elem(Some(self.quoted()?)),
                Some(_) => self.unquoted()?,
                None => return Err(self.err("unterminated array")),
            };
            items.push(item);
            match self.peek() {
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(ArrayNode::List(items));
                }
                Some(c) if c == self.delimiter => self.pos += 1,
                _ => return Err(self.err("expected delimiter or '}'")),
            }
        }
    }

    fn quoted(&mut self) -> Result<String, ArrayParseError> {
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => return Err(self.err("unterminated quoted element")),
                Some(b'"') => {
                    self.pos += 1;
                    break;
                }
                Some(b'\\') => {
                    self.pos += 1;
                    let c = self.peek().ok_or_else(|| self.err("dangling backslash"))?;
                    out.push(c);
                    self.pos += 1;
                }
                Some(c) => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
        String::from_utf8(out).map_err(|_| self.err("element is not UTF-8"))
    }

    fn unquoted(&mut self) -> Result<ArrayNode, ArrayParseError> {
        let start = self.pos;
        while let Some(c) = self.peek() {
            if c == self.delimiter || c == b'}' || c == b'{' || c == b'"' {
                break;
            }
            self.pos += 1;
        }
        let raw = std::str::from_utf8(&self.s[start..self.pos])
            .map_err(|_| self.err("element is not UTF-8"))?;
        if raw.is_empty() {
            return Err(self.err("empty unquoted element"));
        }
        if raw.eq_ignore_ascii_case("NULL") {
            Ok(ArrayNode::Elem(None))
        } else {
            Ok(ArrayNode::Elem(Some(raw.to_owned())))
        }
    }
}

/// Parses an array literal. `delimiter` is `,` for every built-in type except `box` (`;`).
pub fn parse_array(text: &str, delimiter: u8) -> Result<ArrayNode, ArrayParseError> {
    let mut p = Parser {
        s: text.as_bytes(),
        pos: 0,
        delimiter,
    };
    if p.peek() == Some(b'[') {
        // Explicit bounds `[lo:hi]...=`: skip them.
        let eq = text.find('=').ok_or_else(|| p.err("bounds without '='"))?;
        p.pos = eq + 1;
    }
    let node = p.list()?;
    if p.pos != p.s.len() {
        return Err(p.err("trailing characters after array"));
    }
    Ok(node)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Renders like PostgreSQL's `array_out`.
    fn render(node: &ArrayNode) -> String {
        match node {
            ArrayNode::Elem(None) => "NULL".into(),
            ArrayNode::Elem(Some(s)) => {
                let needs_quotes = s.is_empty()
                    || s.eq_ignore_ascii_case("NULL")
                    || s.chars().any(|c| "{},\"\\ \t\n".contains(c));
                if needs_quotes {
                    let escaped = s.replace('\\', "\\\\").replace('"', "\\\"");
                    format!("\"{escaped}\"")
                } else {
                    s.clone()
                }
            }
            ArrayNode::List(items) => {
                let inner: Vec<String> = items.iter().map(render).collect();
                format!("{{{}}}", inner.join(","))
            }
        }
    }

    fn leaf() -> impl Strategy<Value = ArrayNode> {
        proptest::option::of("[a-zA-Z0-9 ,{}\"\\\\é]{0,6}|NULL|null").prop_map(ArrayNode::Elem)
    }

    fn array() -> impl Strategy<Value = ArrayNode> {
        // Rectangular 1-D or 2-D arrays, as PostgreSQL stores them.
        prop_oneof![
            proptest::collection::vec(leaf(), 0..6).prop_map(ArrayNode::List),
            (1usize..4, 1usize..4).prop_flat_map(|(rows, cols)| {
                proptest::collection::vec(
                    proptest::collection::vec(leaf(), cols..=cols).prop_map(ArrayNode::List),
                    rows..=rows,
                )
                .prop_map(ArrayNode::List)
            }),
        ]
    }

    proptest! {
        #[test]
        fn parse_inverts_render(a in array()) {
            prop_assert_eq!(parse_array(&render(&a), b',').unwrap(), a);
        }

        #[test]
        fn never_panics(s in ".{0,40}") {
            let _ = parse_array(&s, b',');
        }
    }

    #[test]
    fn examples() {
        use ArrayNode::*;
        let e = |s: &str| Elem(Some(s.to_owned()));
        assert_eq!(
            parse_array("{1,NULL,\"NULL\"}", b',').unwrap(),
            List(vec![e("1"), Elem(None), e("NULL")])
        );
        assert_eq!(
            parse_array("[0:1]={7,8}", b',').unwrap(),
            List(vec![e("7"), e("8")])
        );
        assert_eq!(parse_array("{}", b',').unwrap(), List(vec![]));
        assert!(parse_array("{1,2", b',').is_err());
        assert!(parse_array("{1,,2}", b',').is_err());
        assert!(parse_array("{1}x", b',').is_err());
    }
}
