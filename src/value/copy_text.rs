//! PostgreSQL's `COPY` text format, written and read. Pure.
//!
//! A row is its values separated by tabs and ended by a newline; SQL NULL is `\N`; backslash,
//! tab, newline and carriage return inside a value are escaped (`\\`, `\t`, `\n`, `\r`), so
//! any text arrives as it was. Apply writes batches of inserted rows this way
//! (`apply::copy`), and capture carries snapshot rows this way on the node stream (a `rows`
//! item, see `sink::kafka::node_stream`), inside a JSON string: [`push_row_json`] writes a
//! row already escaped for one, in a single pass.

/// Appends `value` with COPY's escapes.
pub fn escape_into(out: &mut Vec<u8>, value: &[u8]) {
    let mut start = 0;
    for (i, &b) in value.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'\\' => b"\\\\",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            _ => continue,
        };
        out.extend_from_slice(&value[start..i]);
        out.extend_from_slice(escaped);
        start = i + 1;
    }
    out.extend_from_slice(&value[start..]);
}

/// Appends one row (`None` is SQL NULL).
pub fn push_row<'a>(out: &mut Vec<u8>, values: impl IntoIterator<Item = Option<&'a [u8]>>) {
    for (i, value) in values.into_iter().enumerate() {
        if i > 0 {
            out.push(b'\t');
        }
        match value {
            None => out.extend_from_slice(b"\\N"),
            Some(value) => escape_into(out, value),
        }
    }
    out.push(b'\n');
}

/// Appends one row as [`push_row`] writes it, escaped as the inside of a JSON string: what
/// `serde_json` writes for the row's text, byte for byte. The values must be UTF-8 (a JSON
/// string holds only text; capture has checked them while encoding the row's envelope).
pub fn push_row_json<'a>(out: &mut Vec<u8>, values: impl IntoIterator<Item = Option<&'a [u8]>>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, value) in values.into_iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b"\\t");
        }
        let Some(value) = value else {
            out.extend_from_slice(b"\\\\N");
            continue;
        };
        let mut start = 0;
        for (i, &b) in value.iter().enumerate() {
            // COPY's escape, then JSON's: a backslash is `\\` for COPY, `\\\\` in JSON.
            let escaped: &[u8] = match b {
                b'\\' => b"\\\\\\\\",
                b'\t' => b"\\\\t",
                b'\n' => b"\\\\n",
                b'\r' => b"\\\\r",
                b'"' => b"\\\"",
                0x08 => b"\\b",
                0x0c => b"\\f",
                0..=0x1f => {
                    out.extend_from_slice(&value[start..i]);
                    out.extend_from_slice(b"\\u00");
                    out.push(HEX[usize::from(b >> 4)]);
                    out.push(HEX[usize::from(b & 0xf)]);
                    start = i + 1;
                    continue;
                }
                _ => continue,
            };
            out.extend_from_slice(&value[start..i]);
            out.extend_from_slice(escaped);
            start = i + 1;
        }
        out.extend_from_slice(&value[start..]);
    }
    out.extend_from_slice(b"\\n");
}

/// The rows of `text` (whole rows, each ended by a newline), read as PostgreSQL reads them.
pub fn decode(text: &[u8]) -> Vec<Vec<Option<String>>> {
    // Every row ends with a newline; an empty line is a row of one empty string.
    let Some(lines) = text.strip_suffix(b"\n") else {
        return Vec::new();
    };
    lines
        .split(|&b| b == b'\n')
        .map(|line| {
            line.split(|&b| b == b'\t')
                .map(|raw| match field(raw) {
                    Field::Null => None,
                    Field::Plain(value) => Some(string(value.to_vec())),
                    Field::Unescaped(value) => Some(string(value)),
                })
                .collect()
        })
        .collect()
}

/// What one field of a row (the bytes between tabs) holds, read as PostgreSQL reads it.
#[derive(Debug, PartialEq, Eq)]
pub enum Field<'a> {
    /// `\N`: SQL NULL.
    Null,
    /// A value without backslash sequences: the field's bytes as they are.
    Plain(&'a [u8]),
    /// A value with backslash sequences, read ([`unescape_bytes`]).
    Unescaped(Vec<u8>),
}

/// Reads one field of a row.
pub fn field(raw: &[u8]) -> Field<'_> {
    if raw == b"\\N" {
        Field::Null
    } else if raw.contains(&b'\\') {
        Field::Unescaped(unescape_bytes(raw))
    } else {
        Field::Plain(raw)
    }
}

/// The number of rows in `text`.
pub fn rows_in(text: &[u8]) -> usize {
    text.iter().filter(|&&b| b == b'\n').count()
}

fn string(value: Vec<u8>) -> String {
    // UTF-8 whenever the values were: the escapes are ASCII.
    String::from_utf8(value).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// A field's value with COPY's backslash sequences read as PostgreSQL reads them: `\b`, `\f`,
/// `\n`, `\r`, `\t`, `\v`, octal `\ddd` and hex `\xhh`, any other character after a backslash
/// as itself. (`COPY … TO` writes the first six and `\\`; [`push_row`] only `\\`, `\t`, `\n`
/// and `\r`.)
fn unescape_bytes(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut at = 0;
    while at < field.len() {
        let b = field[at];
        at += 1;
        if b != b'\\' {
            out.push(b);
            continue;
        }
        let Some(&next) = field.get(at) else { break };
        at += 1;
        let digits = |at: usize, radix: u32, max: usize| {
            field[at..]
                .iter()
                .take(max)
                .take_while(|d| char::from(**d).is_digit(radix))
                .count()
        };
        out.push(match next {
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'v' => 0x0b,
            b'0'..=b'7' => {
                let n = digits(at - 1, 8, 3);
                let value = field[at - 1..at - 1 + n]
                    .iter()
                    .fold(0u32, |v, d| v * 8 + u32::from(d - b'0'));
                at += n - 1;
                value as u8
            }
            b'x' if digits(at, 16, 2) > 0 => {
                let n = digits(at, 16, 2);
                let text = std::str::from_utf8(&field[at..at + n]).unwrap_or("0");
                at += n;
                u8::from_str_radix(text, 16).unwrap_or(0)
            }
            other => other,
        });
    }
    out
}

/// Test helpers.
#[cfg(test)]
pub mod testing {
    /// A value as `COPY … TO` writes it (PostgreSQL's CopyAttributeOutText).
    pub fn server_escaped(value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for &b in value {
            match b {
                0x08 => out.extend_from_slice(b"\\b"),
                0x0c => out.extend_from_slice(b"\\f"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                0x0b => out.extend_from_slice(b"\\v"),
                b'\\' => out.extend_from_slice(b"\\\\"),
                _ => out.push(b),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::testing::server_escaped;
    use super::*;
    use proptest::prelude::*;

    fn rows_strategy() -> impl Strategy<Value = Vec<Vec<Option<String>>>> {
        // One to three columns: a row of one empty string is an empty line.
        (1usize..4).prop_flat_map(|width| {
            prop::collection::vec(
                prop::collection::vec(
                    prop::option::of(
                        "(\\\\|\t|\n|\r|\"|\u{1}|\u{8}|\u{c}|\u{1f}|N|\\\\N|[a-zé ]|\u{1F600}){0,12}",
                    ),
                    width,
                ),
                0..20,
            )
        })
    }

    fn as_bytes(row: &[Option<String>]) -> impl Iterator<Item = Option<&[u8]>> {
        row.iter().map(|v| v.as_deref().map(str::as_bytes))
    }

    #[test]
    fn octal_and_hex_sequences_read_as_postgresql_reads_them() {
        assert_eq!(unescape_bytes(b"a\\101\\x41\\7z\\xg\\q\\"), b"aAA\x07zxgq");
    }

    proptest! {
        #[test]
        fn what_the_server_writes_reads_back(value in prop::collection::vec(any::<u8>(), 0..40)) {
            prop_assert_eq!(unescape_bytes(&server_escaped(&value)), value);
        }

        #[test]
        fn rows_read_back_as_they_were(rows in rows_strategy()) {
            let mut text = Vec::new();
            for row in &rows {
                push_row(&mut text, as_bytes(row));
            }
            prop_assert_eq!(rows_in(&text), rows.len());
            prop_assert_eq!(decode(&text), rows);
        }

        #[test]
        fn json_rows_are_what_serde_writes_for_the_text(rows in rows_strategy()) {
            let (mut text, mut json) = (Vec::new(), Vec::new());
            for row in &rows {
                push_row(&mut text, as_bytes(row));
                push_row_json(&mut json, as_bytes(row));
            }
            let text = String::from_utf8(text).unwrap();
            let expected = serde_json::to_string(&text).unwrap();
            prop_assert_eq!(format!("\"{}\"", String::from_utf8(json).unwrap()), expected);
        }
    }
}
