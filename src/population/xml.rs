//! A small, bounded reading of saved OCI-P documents (responses and requests that OCI-P clients
//! write to disk) into a tree of elements. Pure: bytes in, tree out.
//!
//! The request parser of [`crate::oci`] reads only the commands flowthrough accepts from the AS;
//! exports are other commands (list and get responses with tables), so they get this reader. The
//! same hostile-input rules hold: a DOCTYPE is refused (no entity is ever expanded), depth and
//! size are bounded, malformed XML is an error, never a panic.

use quick_xml::Reader;
use quick_xml::events::Event;

/// The largest document read: a system-wide user list of 100,000 users is about 40 MiB.
pub const MAX_BYTES: usize = 256 * 1024 * 1024;
const MAX_DEPTH: usize = 32;

/// An element: its local name (prefix dropped), its `xsi:type` if any, text and children.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Element {
    pub name: String,
    pub xsi_type: Option<String>,
    pub text: String,
    pub children: Vec<Element>,
}

impl Element {
    /// The first child with this name.
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    /// The trimmed text of the first child with this name, if it has any.
    pub fn child_text(&self, name: &str) -> Option<&str> {
        self.child(name)
            .map(|c| c.text.trim())
            .filter(|t| !t.is_empty())
    }

    /// Children with this name, in order.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }
}

/// The text of a document in the encoding its declaration names (UTF-8 or ISO-8859-1).
pub fn decode(bytes: &[u8]) -> Result<String, String> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let head = &bytes[..bytes.len().min(200)];
    let declaration = head
        .strip_prefix(b"<?xml")
        .and_then(|rest| rest.split(|&b| b == b'>').next())
        .map(|d| String::from_utf8_lossy(d).to_ascii_lowercase())
        .unwrap_or_default();
    if declaration.contains("iso-8859-1") || declaration.contains("latin1") {
        return Ok(latin1(bytes));
    }
    String::from_utf8(bytes.to_vec()).map_err(|e| {
        format!(
            "byte {} is not UTF-8; declare encoding=\"ISO-8859-1\" if the file is Latin-1",
            e.utf8_error().valid_up_to()
        )
    })
}

/// ISO-8859-1 maps each byte to the code point of the same number.
pub fn latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| char::from(b)).collect()
}

/// The root element of a document.
pub fn parse(bytes: &[u8]) -> Result<Element, String> {
    if bytes.len() > MAX_BYTES {
        return Err(format!(
            "the document has {} bytes, more than the {MAX_BYTES} read; split the export",
            bytes.len()
        ));
    }
    let text = decode(bytes)?;
    let mut reader = Reader::from_str(&text);
    reader.config_mut().trim_text(false);
    let mut stack: Vec<Element> = Vec::new();
    loop {
        let at = reader.buffer_position();
        let event = reader
            .read_event()
            .map_err(|e| format!("malformed XML at byte {at}: {e}"))?;
        match event {
            Event::DocType(_) => {
                return Err(format!(
                    "a DOCTYPE at byte {at}; OCI-P documents have none and entity declarations are refused"
                ));
            }
            Event::Start(e) | Event::Empty(e) if stack.len() >= MAX_DEPTH => {
                let name = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
                return Err(format!(
                    "element <{name}> at byte {at} is nested deeper than {MAX_DEPTH} levels"
                ));
            }
            Event::Start(e) => stack.push(open(&e)?),
            Event::Empty(e) => {
                let element = open(&e)?;
                attach(&mut stack, element);
            }
            Event::End(_) => {
                let Some(done) = stack.pop() else {
                    return Err(format!("a closing tag without an opening one at byte {at}"));
                };
                if stack.is_empty() {
                    return Ok(done);
                }
                attach(&mut stack, done);
            }
            Event::Text(t) => {
                if let Some(top) = stack.last_mut() {
                    let raw = String::from_utf8_lossy(t.as_ref()).into_owned();
                    let value = quick_xml::escape::unescape(&raw)
                        .map_err(|e| format!("bad character reference at byte {at}: {e}"))?;
                    top.text.push_str(&value);
                }
            }
            Event::CData(t) => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&String::from_utf8_lossy(t.as_ref()));
                }
            }
            Event::GeneralRef(r) => {
                if let Some(top) = stack.last_mut() {
                    let reference = format!("&{};", String::from_utf8_lossy(r.as_ref()));
                    let value = quick_xml::escape::unescape(&reference)
                        .map_err(|e| format!("bad entity reference at byte {at}: {e}"))?;
                    top.text.push_str(&value);
                }
            }
            Event::Eof => {
                return Err("the document ends before its root element is closed".to_owned());
            }
            _ => {}
        }
    }
}

fn open(e: &quick_xml::events::BytesStart<'_>) -> Result<Element, String> {
    let name = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
    let mut xsi_type = None;
    for attribute in e.attributes() {
        let attribute = attribute.map_err(|err| format!("bad attribute on <{name}>: {err}"))?;
        if attribute.key.local_name().as_ref() == b"type"
            && attribute
                .key
                .prefix()
                .is_some_and(|p| p.as_ref() != b"xmlns")
        {
            let value = String::from_utf8_lossy(&attribute.value).into_owned();
            // `c:UserGetResponse23` → `UserGetResponse23`.
            let local = value.rsplit(':').next().unwrap_or(&value).to_owned();
            xsi_type = Some(local);
        }
    }
    Ok(Element {
        name,
        xsi_type,
        ..Element::default()
    })
}

fn attach(stack: &mut [Element], element: Element) {
    if let Some(parent) = stack.last_mut() {
        parent.children.push(element);
    }
}

/// An OCI table (`colHeading`s, then `row`s of `col`s) as rows of (heading, value).
pub fn table(element: &Element) -> Result<Vec<Vec<(String, String)>>, String> {
    let headings: Vec<String> = element
        .all("colHeading")
        .map(|h| h.text.trim().to_owned())
        .collect();
    element
        .all("row")
        .enumerate()
        .map(|(n, row)| {
            let cols: Vec<&Element> = row.all("col").collect();
            if cols.len() != headings.len() {
                return Err(format!(
                    "row {} of <{}> has {} columns, the table has {} headings",
                    n + 1,
                    element.name,
                    cols.len(),
                    headings.len()
                ));
            }
            Ok(headings
                .iter()
                .cloned()
                .zip(cols.iter().map(|c| c.text.trim().to_owned()))
                .collect())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_is_read_with_its_headings_and_entities() {
        let doc = br#"<?xml version="1.0" encoding="UTF-8"?>
<BroadsoftDocument protocol="OCI" xmlns="C" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
<sessionId xmlns="">s</sessionId>
<command xsi:type="c:UserGetListInGroupResponse" xmlns="" xmlns:c="C"><userTable>
<colHeading>User Id</colHeading><colHeading>Last Name</colHeading>
<row><col>a@x</col><col>O&apos;Brien &amp; Co</col></row>
<row><col>b@x</col><col/></row>
</userTable></command></BroadsoftDocument>"#;
        let root = parse(doc).unwrap();
        assert_eq!(root.name, "BroadsoftDocument");
        let command = root.child("command").unwrap();
        assert_eq!(
            command.xsi_type.as_deref(),
            Some("UserGetListInGroupResponse")
        );
        let rows = table(command.child("userTable").unwrap()).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0][1], ("Last Name".into(), "O'Brien & Co".into()));
        assert_eq!(rows[1][1].1, "");
    }

    #[test]
    fn latin1_documents_keep_their_accents() {
        let mut doc = b"<?xml version=\"1.0\" encoding=\"ISO-8859-1\"?><a><b>M".to_vec();
        doc.push(0xFC);
        doc.extend_from_slice(b"ller</b></a>");
        assert_eq!(parse(&doc).unwrap().child_text("b"), Some("Müller"));
        let mut bad = b"<a><b>M".to_vec();
        bad.push(0xFC);
        bad.extend_from_slice(b"</b></a>");
        assert!(parse(&bad).unwrap_err().contains("not UTF-8"));
    }

    #[test]
    fn hostile_and_broken_documents_are_refused_with_a_reason() {
        let entity = br#"<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "y">]><a>&x;</a>"#;
        assert!(parse(entity).unwrap_err().contains("DOCTYPE"));
        let deep = "<a>".repeat(40) + &"</a>".repeat(40);
        assert!(parse(deep.as_bytes()).unwrap_err().contains("deeper"));
        assert!(parse(b"<a><b></a>").unwrap_err().contains("malformed"));
        assert!(parse(b"<a><b>").unwrap_err().contains("ends before"));
        let ragged = br#"<t><colHeading>A</colHeading><colHeading>B</colHeading><row><col>1</col></row></t>"#;
        assert!(
            table(&parse(ragged).unwrap())
                .unwrap_err()
                .contains("row 1")
        );
    }
}
