//! JSON text exactly as qemu-img prints it (`--output=json` of info, check and measure).
//!
//! QEMU builds its output as a dictionary and prints the dictionary in its hash table's order:
//! 512 buckets chosen by a fixed string hash of the key, buckets in ascending order, and within
//! one bucket the key added last first (keys are added in the order of the QAPI schema). It
//! indents by four spaces, prints an empty list or dictionary on two lines, and escapes every
//! character outside printable ASCII as `\uXXXX` (upper-case hex). [`QDict`] keeps keys in the
//! order they were added (the schema's order); [`pretty`] prints them in QEMU's.

use serde_json::Value;

/// Number of buckets in QEMU's dictionary.
const BUCKETS: u32 = 512;

/// A value of QEMU's output tree.
#[derive(Debug, Clone, PartialEq)]
pub enum QValue {
    /// true or false.
    Bool(bool),
    /// A signed integer.
    Int(i64),
    /// An unsigned integer.
    UInt(u64),
    /// A string.
    Str(String),
    /// A list.
    List(Vec<QValue>),
    /// A dictionary.
    Dict(QDict),
}

/// A dictionary whose keys keep the order they were added in.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct QDict(Vec<(String, QValue)>);

impl QDict {
    /// An empty dictionary.
    pub fn new() -> QDict {
        QDict(Vec::new())
    }

    /// Add `key` (or replace its value, keeping its place).
    pub fn put(&mut self, key: &str, v: impl Into<QValue>) {
        let v = v.into();
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some(e) => e.1 = v,
            None => self.0.push((key.to_string(), v)),
        }
    }

    /// Add `key` when `v` is present.
    pub fn put_opt<T: Into<QValue>>(&mut self, key: &str, v: Option<T>) {
        if let Some(v) = v {
            self.put(key, v);
        }
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&QValue> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<bool> for QValue {
    fn from(v: bool) -> QValue {
        QValue::Bool(v)
    }
}
impl From<u64> for QValue {
    fn from(v: u64) -> QValue {
        QValue::UInt(v)
    }
}
impl From<u32> for QValue {
    fn from(v: u32) -> QValue {
        QValue::UInt(v.into())
    }
}
impl From<i64> for QValue {
    fn from(v: i64) -> QValue {
        QValue::Int(v)
    }
}
impl From<&str> for QValue {
    fn from(v: &str) -> QValue {
        QValue::Str(v.to_string())
    }
}
impl From<String> for QValue {
    fn from(v: String) -> QValue {
        QValue::Str(v)
    }
}
impl From<&String> for QValue {
    fn from(v: &String) -> QValue {
        QValue::Str(v.clone())
    }
}
impl From<QDict> for QValue {
    fn from(v: QDict) -> QValue {
        QValue::Dict(v)
    }
}
impl From<Vec<QValue>> for QValue {
    fn from(v: Vec<QValue>) -> QValue {
        QValue::List(v)
    }
}

impl From<&Value> for QValue {
    /// A serde value; its objects' keys are taken in the order the value iterates them.
    fn from(v: &Value) -> QValue {
        match v {
            Value::Null => QValue::Str(String::new()),
            Value::Bool(b) => QValue::Bool(*b),
            Value::Number(n) => match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => QValue::UInt(u),
                (None, Some(i)) => QValue::Int(i),
                _ => QValue::Str(n.to_string()),
            },
            Value::String(s) => QValue::Str(s.clone()),
            Value::Array(a) => QValue::List(a.iter().map(QValue::from).collect()),
            Value::Object(o) => QValue::Dict(QDict(
                o.iter().map(|(k, v)| (k.clone(), v.into())).collect(),
            )),
        }
    }
}

impl QValue {
    /// The same tree as a serde value (for programs that parse rather than print).
    pub fn to_value(&self) -> Value {
        match self {
            QValue::Bool(b) => Value::Bool(*b),
            QValue::Int(i) => Value::from(*i),
            QValue::UInt(u) => Value::from(*u),
            QValue::Str(s) => Value::String(s.clone()),
            QValue::List(l) => Value::Array(l.iter().map(QValue::to_value).collect()),
            QValue::Dict(d) => {
                Value::Object(d.0.iter().map(|(k, v)| (k.clone(), v.to_value())).collect())
            }
        }
    }
}

/// QEMU's string hash (the one its dictionary buckets by), reduced to a bucket.
fn bucket(key: &str) -> u32 {
    let b = key.as_bytes();
    let mut h = 0x238F_13AFu32.wrapping_mul(b.len() as u32);
    for (i, &c) in b.iter().enumerate() {
        h = h.wrapping_add(u32::from(c) << ((i * 5) % 24));
    }
    h.wrapping_mul(1_103_515_243).wrapping_add(12345) % BUCKETS
}

/// The entries of `d` in the order QEMU prints them.
fn qemu_order(d: &QDict) -> Vec<&(String, QValue)> {
    let mut e: Vec<(u32, usize, &(String, QValue))> =
        d.0.iter()
            .enumerate()
            .map(|(i, kv)| (bucket(&kv.0), i, kv))
            .collect();
    // Ascending bucket; within a bucket, the key added last comes first.
    e.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    e.into_iter().map(|(_, _, kv)| kv).collect()
}

fn string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04X}"));
                }
            }
        }
    }
    out.push('"');
}

fn indent(out: &mut String, level: usize) {
    out.push('\n');
    for _ in 0..level {
        out.push_str("    ");
    }
}

fn write(out: &mut String, v: &QValue, level: usize) {
    match v {
        QValue::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        QValue::Int(i) => out.push_str(&i.to_string()),
        QValue::UInt(u) => out.push_str(&u.to_string()),
        QValue::Str(s) => string(out, s),
        QValue::List(l) => {
            out.push('[');
            for (i, e) in l.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                indent(out, level + 1);
                write(out, e, level + 1);
            }
            indent(out, level);
            out.push(']');
        }
        QValue::Dict(d) => {
            out.push('{');
            for (i, (k, e)) in qemu_order(d).into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                indent(out, level + 1);
                string(out, k);
                out.push_str(": ");
                write(out, e, level + 1);
            }
            indent(out, level);
            out.push('}');
        }
    }
}

/// `v` as qemu-img prints it, with the final newline.
pub fn pretty(v: &QValue) -> String {
    let mut s = String::new();
    write(&mut s, v, 0);
    s.push('\n');
    s
}

/// `v` as qemu-img's text output prints a QAPI object (format-specific information):
/// `key: value` lines in QEMU's order with '-' in keys shown as ' ', nested dictionaries and
/// lists indented four more spaces under `key:`, list items as `[i]:`.
pub fn dump_human(out: &mut String, v: &QValue, level: usize) {
    let pad = "    ".repeat(level);
    let composite = |v: &QValue| matches!(v, QValue::Dict(_) | QValue::List(_));
    match v {
        QValue::Dict(d) => {
            for (k, e) in qemu_order(d) {
                out.push_str(&format!("{pad}{}:", k.replace('-', " ")));
                out.push(if composite(e) { '\n' } else { ' ' });
                dump_human(out, e, level + 1);
            }
        }
        QValue::List(l) => {
            for (i, e) in l.iter().enumerate() {
                out.push_str(&format!("{pad}[{i}]:"));
                out.push(if composite(e) { '\n' } else { ' ' });
                dump_human(out, e, level + 1);
            }
        }
        QValue::Bool(b) => out.push_str(if *b { "true\n" } else { "false\n" }),
        QValue::Int(i) => out.push_str(&format!("{i}\n")),
        QValue::UInt(u) => out.push_str(&format!("{u}\n")),
        QValue::Str(s) => {
            out.push_str(s);
            out.push('\n');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_layout_and_escapes_are_qemus() {
        // Keys in QAPI's order for `qemu-img check`; QEMU prints them in its bucket order.
        let mut d = QDict::new();
        d.put("filename", "é\"x\\.qcow2");
        d.put("format", "qcow2");
        d.put("check-errors", 0u64);
        d.put("image-end-offset", 1507328u64);
        d.put("total-clusters", 1024u64);
        d.put("allocated-clusters", 16u64);
        d.put("children", QValue::List(vec![]));
        d.put("format-specific", QDict::new());
        let s = pretty(&QValue::Dict(d));
        assert_eq!(
            s,
            "{\n    \"image-end-offset\": 1507328,\n    \"total-clusters\": 1024,\n    \
             \"check-errors\": 0,\n    \"children\": [\n    ],\n    \"allocated-clusters\": 16,\n    \
             \"filename\": \"\\u00E9\\\"x\\\\.qcow2\",\n    \"format\": \"qcow2\",\n    \
             \"format-specific\": {\n    }\n}\n"
        );
    }

    #[test]
    fn one_bucket_puts_the_later_key_first() {
        // "children" and "backing-filename-format" share a bucket; QAPI adds children last.
        assert_eq!(bucket("children"), bucket("backing-filename-format"));
        let mut d = QDict::new();
        d.put("backing-filename-format", "qcow2");
        d.put("children", QValue::List(vec![]));
        let s = pretty(&QValue::Dict(d));
        assert!(
            s.find("children") < s.find("backing-filename-format"),
            "{s}"
        );
    }
}
