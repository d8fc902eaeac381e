//! Parsing OCI-P request documents: bytes in their declared encoding → a typed [`Document`],
//! refusing hostile input (DTDs, entities, depth, size) with a positioned, typed error.
//!
//! Design choices worth knowing before changing this file:
//! - Streaming (quick-xml `NsReader` over the byte slice), no serde: one pass, no DOM, no
//!   recursion, so nesting depth cannot exhaust the stack and memory is bounded by the input.
//! - The encoding is read from the XML declaration before parsing and the whole body is validated
//!   once (UTF-8) so that every later decode is a cheap check; ISO-8859-1 maps byte → char.
//! - Problems with one command (a missing `userId`, a non-boolean `isActive`) become
//!   [`Command::Invalid`] so the other commands of the batch still run; problems with the document
//!   itself are a [`ParseError`], classified by [`ParseError::class`].
//! - Child elements are matched by local name whatever their namespace: the SPEC requires them
//!   unqualified, but an AS that forgets `xmlns=""` still means the same thing.

use std::borrow::Cow;
use std::fmt;

use quick_xml::NsReader;
use quick_xml::events::{BytesStart, Event};
use quick_xml::name::{Namespace, ResolveResult};

use super::model::{Change, Command, Document, Request, Session, UserChanges, UserProfile};

const XSI: &[u8] = b"http://www.w3.org/2001/XMLSchema-instance";
const OCI_NAMESPACE: &[u8] = b"C";
const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// Bounds on what one document may cost. The defaults suit real AS traffic with a wide margin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseLimits {
    /// Whole body, in bytes (the HTTP layer enforces its own limit first; this is the backstop).
    pub max_bytes: usize,
    /// Element nesting, root included.
    pub max_depth: usize,
    /// `command` elements per document (OCI-P allows 15).
    pub max_commands: usize,
    /// Bytes of one text value (a field, the session id).
    pub max_text_len: usize,
}

impl Default for ParseLimits {
    fn default() -> Self {
        ParseLimits {
            max_bytes: 256 * 1024,
            max_depth: 32,
            max_commands: 15,
            max_text_len: 16 * 1024,
        }
    }
}

/// Where in the document something went wrong: 1-based line and column (in characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: u32,
    pub column: u32,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

/// What the server should do with a document that failed to parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Not XML at all, or XML that is not an OCI-P document (no `BroadsoftDocument` root in
    /// namespace `C` with `protocol="OCI"`, a DOCTYPE, an unreadable encoding): HTTP 400.
    NotOci,
    /// An OCI-P document (root and protocol were right) that is malformed further in: HTTP 200
    /// with an `ErrorResponse` 7001, carrying [`ParseError::session`] when it was read.
    Malformed,
    /// Over [`ParseLimits::max_bytes`]: HTTP 413.
    TooLarge,
}

/// The ways a document can fail to parse. Each message says what was found and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseErrorKind {
    #[error(
        "the document is {size} bytes, over the {max}-byte limit: send smaller batches or raise the body limit"
    )]
    TooLarge { size: usize, max: usize },
    #[error("the body holds no XML element: expected an OCI-P `BroadsoftDocument`")]
    Empty,
    #[error(
        "the document is encoded as `{declared}`; flowthrough reads only UTF-8 and ISO-8859-1: configure the AS to send one of them"
    )]
    UnsupportedEncoding { declared: String },
    #[error(
        "{at}: bytes that are not valid {encoding}: the content does not match the encoding the XML declaration names"
    )]
    InvalidBytes {
        at: Position,
        encoding: &'static str,
    },
    #[error("{at}: not well-formed XML: {message}")]
    Syntax { at: Position, message: String },
    #[error(
        "{at}: character U+{code:04X} is not allowed in an XML 1.0 document (control characters other than tab, line feed and carriage return never are); the sender must drop or replace it"
    )]
    ForbiddenCharacter { at: Position, code: u32 },
    #[error(
        "{at}: DOCTYPE declarations are refused (no DTD or entity is ever processed): send the document without one"
    )]
    DocType { at: Position },
    #[error(
        "{at}: unknown entity `&{name};`: only the five XML entities and character references (&#233;) are allowed"
    )]
    UnknownEntity { at: Position, name: String },
    #[error("{at}: elements nested deeper than {max} levels")]
    TooDeep { at: Position, max: usize },
    #[error("{at}: a text value longer than {max} bytes")]
    TextTooLong { at: Position, max: usize },
    #[error(
        "{at}: the root element is `{found}` in namespace {namespace}, expected `BroadsoftDocument` in namespace `C`: this is not an OCI-P document"
    )]
    WrongRoot {
        at: Position,
        found: String,
        namespace: String,
    },
    #[error("{at}: `BroadsoftDocument` has protocol {found}, expected `OCI`")]
    WrongProtocol { at: Position, found: String },
    #[error(
        "{at}: no non-empty `sessionId` before the first `command`: the envelope must start with the session"
    )]
    MissingSession { at: Position },
    #[error("{at}: the document has no `command`: an OCI-P document carries 1 to 15")]
    NoCommands { at: Position },
    #[error("{at}: more than {max} commands in one document: split the batch")]
    TooManyCommands { at: Position, max: usize },
    #[error(
        "{at}: `command` has no xsi:type: each command must name its type, e.g. xsi:type=\"UserAddRequest17sp4\""
    )]
    MissingXsiType { at: Position },
    #[error("{at}: the document ends before its root element is closed: it was truncated")]
    Truncated { at: Position },
    #[error("{at}: content after the end of the root element")]
    TrailingContent { at: Position },
}

/// A document-level parse failure: its [`kind`](Self::kind), whether the document was recognised
/// as OCI-P, and the session id when it had been read (so a 7001 response can still carry it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}")]
pub struct ParseError {
    kind: ParseErrorKind,
    oci: bool,
    session: Option<Session>,
}

impl ParseError {
    pub fn kind(&self) -> &ParseErrorKind {
        &self.kind
    }

    /// How the server answers; see [`ErrorClass`].
    pub fn class(&self) -> ErrorClass {
        match self.kind {
            ParseErrorKind::TooLarge { .. } => ErrorClass::TooLarge,
            _ if self.oci => ErrorClass::Malformed,
            _ => ErrorClass::NotOci,
        }
    }

    /// The envelope's session, when the parser got that far.
    pub fn session(&self) -> Option<&Session> {
        self.session.as_ref()
    }

    fn bare(kind: ParseErrorKind) -> Self {
        ParseError {
            kind,
            oci: false,
            session: None,
        }
    }
}

/// Parses one OCI-P request document. Never panics; see the module header for the rules.
pub fn parse(bytes: &[u8], limits: &ParseLimits) -> Result<Document, ParseError> {
    if bytes.len() > limits.max_bytes {
        return Err(ParseError::bare(ParseErrorKind::TooLarge {
            size: bytes.len(),
            max: limits.max_bytes,
        }));
    }
    let input = bytes.strip_prefix(UTF8_BOM).unwrap_or(bytes);
    let encoding = sniff_encoding(input).map_err(ParseError::bare)?;
    let invalid_at = encoding.first_invalid(input);
    // A body that every accepted encoding reads as the same UTF-8 text is handed to quick-xml as
    // a `str`: it then skips looking the declared label up in its encoding tables on every
    // document, and anything it decodes itself (character references) reads the same.
    let same_as_utf8 = encoding == Encoding::Utf8 || input.is_ascii();
    let mut reader = match std::str::from_utf8(input) {
        Ok(text) if same_as_utf8 => NsReader::from_str(text),
        _ => NsReader::from_reader(input),
    };
    reader.config_mut().trim_text(false);
    let mut parser = Parser {
        input,
        encoding,
        limits,
        invalid_at,
        reader,
        depth: 0,
        root: RootState::Before,
        session: None,
        // Most documents carry one command; a `Request` is ~350 bytes, so the default first
        // growth to four would be a large allocation that makes malloc consolidate its bins.
        commands: Vec::with_capacity(1),
        command: None,
        capture: None,
        // Room for a typical value, so the first few do not each grow the buffer.
        text: String::with_capacity(64),
    };
    parser.run().map_err(|kind| ParseError {
        kind,
        oci: parser.root != RootState::Before,
        session: parser.session.take(),
    })
}

/// The encodings a document may declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Utf8,
    /// Declared `US-ASCII`: read as UTF-8 after checking every byte is ASCII.
    Ascii,
    Latin1,
}

impl Encoding {
    fn label(self) -> &'static str {
        match self {
            Encoding::Utf8 => "UTF-8",
            Encoding::Ascii => "US-ASCII",
            Encoding::Latin1 => "ISO-8859-1",
        }
    }

    /// Offset of the first byte the encoding cannot carry, `usize::MAX` if none.
    fn first_invalid(self, input: &[u8]) -> usize {
        match self {
            Encoding::Utf8 => std::str::from_utf8(input)
                .err()
                .map_or(usize::MAX, |e| e.valid_up_to()),
            Encoding::Ascii => input
                .iter()
                .position(|b| !b.is_ascii())
                .unwrap_or(usize::MAX),
            Encoding::Latin1 => usize::MAX,
        }
    }

    fn decode_into(self, raw: &[u8], out: &mut String) -> Result<(), ()> {
        out.push_str(&self.decode(raw)?);
        Ok(())
    }

    /// Borrowed unless ISO-8859-1 bytes above 0x7F must be re-encoded: values are nearly always
    /// ASCII, which is the same bytes in all three encodings.
    fn decode(self, raw: &[u8]) -> Result<Cow<'_, str>, ()> {
        match self {
            Encoding::Latin1 if !raw.is_ascii() => {
                Ok(Cow::Owned(raw.iter().map(|&b| char::from(b)).collect()))
            }
            Encoding::Utf8 | Encoding::Ascii | Encoding::Latin1 => {
                std::str::from_utf8(raw).map(Cow::Borrowed).map_err(|_| ())
            }
        }
    }
}

/// Reads the encoding named by the XML declaration (UTF-8 when there is none, as XML says).
fn sniff_encoding(input: &[u8]) -> Result<Encoding, ParseErrorKind> {
    // UTF-16/32 put a NUL in the first two bytes or start with a BOM; refuse them up front so
    // the byte-oriented reader never misreads them.
    if input.starts_with(b"\xFE\xFF")
        || input.starts_with(b"\xFF\xFE")
        || input.iter().take(2).any(|&b| b == 0)
    {
        return Err(ParseErrorKind::UnsupportedEncoding {
            declared: "UTF-16 or UTF-32".to_owned(),
        });
    }
    let Some(decl) = input.strip_prefix(b"<?xml") else {
        return Ok(Encoding::Utf8);
    };
    let end = decl.iter().take(512).position(|&b| b == b'>').unwrap_or(0);
    let decl = &decl[..end];
    let Some(at) = decl.windows(8).position(|w| w == b"encoding") else {
        return Ok(Encoding::Utf8);
    };
    let rest = decl[at + 8..].trim_ascii_start();
    let Some(rest) = rest.strip_prefix(b"=") else {
        return Ok(Encoding::Utf8); // quick-xml reports the broken declaration with a position.
    };
    let rest = rest.trim_ascii_start();
    let Some((&quote, rest)) = rest
        .split_first()
        .filter(|(q, _)| **q == b'"' || **q == b'\'')
    else {
        return Ok(Encoding::Utf8);
    };
    let name = &rest[..rest.iter().position(|&b| b == quote).unwrap_or(rest.len())];
    const LABELS: [(&[u8], Encoding); 10] = [
        (b"utf-8", Encoding::Utf8),
        (b"utf8", Encoding::Utf8),
        (b"us-ascii", Encoding::Ascii),
        (b"ascii", Encoding::Ascii),
        (b"iso-8859-1", Encoding::Latin1),
        (b"iso8859-1", Encoding::Latin1),
        (b"iso_8859-1", Encoding::Latin1),
        (b"latin1", Encoding::Latin1),
        (b"latin-1", Encoding::Latin1),
        (b"l1", Encoding::Latin1),
    ];
    match LABELS
        .iter()
        .find(|(label, _)| label.eq_ignore_ascii_case(name))
    {
        Some(&(_, encoding)) => Ok(encoding),
        None => Err(ParseErrorKind::UnsupportedEncoding {
            declared: String::from_utf8_lossy(name).into_owned(),
        }),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RootState {
    Before,
    Open,
    Closed,
}

/// A field of a command that flowthrough reads; every other element is skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    ServiceProviderId,
    GroupId,
    UserId,
    NewUserId,
    FirstName,
    LastName,
    PhoneNumber,
    Extension,
    MobilePhoneNumber,
    EmailAddress,
    Language,
    TimeZone,
    AlternateUserId,
    IsEnterprise,
    IsActive,
    GroupName,
    ServiceProviderName,
    ServiceName,
}

const FIELD_COUNT: usize = Field::ServiceName as usize + 1;

impl Field {
    const ALL: [Field; FIELD_COUNT] = [
        Field::ServiceProviderId,
        Field::GroupId,
        Field::UserId,
        Field::NewUserId,
        Field::FirstName,
        Field::LastName,
        Field::PhoneNumber,
        Field::Extension,
        Field::MobilePhoneNumber,
        Field::EmailAddress,
        Field::Language,
        Field::TimeZone,
        Field::AlternateUserId,
        Field::IsEnterprise,
        Field::IsActive,
        Field::GroupName,
        Field::ServiceProviderName,
        Field::ServiceName,
    ];

    fn name(self) -> &'static str {
        match self {
            Field::ServiceProviderId => "serviceProviderId",
            Field::GroupId => "groupId",
            Field::UserId => "userId",
            Field::NewUserId => "newUserId",
            Field::FirstName => "firstName",
            Field::LastName => "lastName",
            Field::PhoneNumber => "phoneNumber",
            Field::Extension => "extension",
            Field::MobilePhoneNumber => "mobilePhoneNumber",
            Field::EmailAddress => "emailAddress",
            Field::Language => "language",
            Field::TimeZone => "timeZone",
            Field::AlternateUserId => "alternateUserId",
            Field::IsEnterprise => "isEnterprise",
            Field::IsActive => "isActive",
            Field::GroupName => "groupName",
            Field::ServiceProviderName => "serviceProviderName",
            Field::ServiceName => "serviceName",
        }
    }

    fn from_name(local: &[u8]) -> Option<Field> {
        Field::ALL
            .into_iter()
            .find(|f| f.name().as_bytes() == local)
    }
}

/// A field's value as sent: text (trimmed) or `xsi:nil="true"`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    Text(String),
    Nil,
}

/// The fields read so far from one command.
#[derive(Debug, Default)]
struct Fields {
    values: [Option<Value>; FIELD_COUNT],
    services: Vec<String>,
    /// The first repeated single-valued field: the command is then invalid.
    repeated: Option<Field>,
}

impl Fields {
    fn set(&mut self, field: Field, value: Value) {
        if field == Field::ServiceName {
            if let Value::Text(s) = value
                && !s.is_empty()
            {
                self.services.push(s);
            }
            return;
        }
        let slot = &mut self.values[field as usize];
        if slot.is_some() && field == Field::AlternateUserId {
            // Up to four entries since R22; the first is the user's primary alternate id.
        } else if slot.is_some() {
            self.repeated.get_or_insert(field);
        } else {
            *slot = Some(value);
        }
    }

    fn take(&mut self, field: Field) -> Option<Value> {
        self.values[field as usize].take()
    }

    /// Set and non-empty, else `None` (on an add, nil means absent).
    fn optional(&mut self, field: Field) -> Option<String> {
        match self.take(field) {
            Some(Value::Text(s)) if !s.is_empty() => Some(s),
            _ => None,
        }
    }

    fn required(&mut self, field: Field, command: &str) -> Result<String, String> {
        self.optional(field).ok_or_else(|| {
            format!(
                "`{command}` has no `{}`: the element is required and must not be empty",
                field.name()
            )
        })
    }

    /// An empty element carries no value: OCI-P types have a minimum length of 1, so blanking the
    /// field is the only thing it can mean; treat it like `xsi:nil`.
    fn change(&mut self, field: Field) -> Change<String> {
        match self.take(field) {
            None => Change::Absent,
            Some(Value::Nil) => Change::Clear,
            Some(Value::Text(s)) if s.is_empty() => Change::Clear,
            Some(Value::Text(s)) => Change::Set(s),
        }
    }

    fn boolean(&mut self, field: Field) -> Result<Option<bool>, String> {
        match self.take(field) {
            None | Some(Value::Nil) => Ok(None),
            Some(Value::Text(s)) => match s.as_str() {
                "true" | "1" => Ok(Some(true)),
                "false" | "0" => Ok(Some(false)),
                _ => Err(format!(
                    "`{}` is `{s}`, not an XML boolean (true, false, 1 or 0)",
                    field.name()
                )),
            },
        }
    }
}

/// The commands flowthrough understands, by base name (see [`command_kind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    UserAdd,
    UserModify,
    UserDelete,
    ServiceAssign,
    ServiceUnassign,
    IntegratedImpModify,
    GroupAdd,
    ServiceProviderAdd,
    GroupDelete,
    ServiceProviderDelete,
}

const KINDS: [(&str, Kind); 10] = [
    ("UserAddRequest", Kind::UserAdd),
    ("UserModifyRequest", Kind::UserModify),
    ("UserDeleteRequest", Kind::UserDelete),
    ("UserServiceAssignListRequest", Kind::ServiceAssign),
    ("UserServiceUnassignListRequest", Kind::ServiceUnassign),
    ("UserIntegratedIMPModifyRequest", Kind::IntegratedImpModify),
    ("GroupAddRequest", Kind::GroupAdd),
    ("ServiceProviderAddRequest", Kind::ServiceProviderAdd),
    ("GroupDeleteRequest", Kind::GroupDelete),
    ("ServiceProviderDeleteRequest", Kind::ServiceProviderDelete),
];

/// Maps a command name to its kind. The rule follows the public OCI-P naming of releases: the base
/// name, optionally followed by a release suffix `<digits>[(sp|mp)<digits>][V<digits>]`
/// (`UserAddRequest17sp4`, `UserAddRequest22V2`, `UserModifyRequest22`,
/// `ServiceProviderAddRequest13mp2`). Anything else that merely starts with a base name
/// (`UserAddRequestFoo`, `UserAddRequest17sp`, `UserAddRequestV2`) is a different command.
fn command_kind(name: &str) -> Option<Kind> {
    KINDS
        .iter()
        .find(|(base, _)| name.strip_prefix(base).is_some_and(is_release_suffix))
        .map(|&(_, kind)| kind)
}

fn is_release_suffix(s: &str) -> bool {
    fn digits(s: &[u8]) -> Option<&[u8]> {
        let n = s.iter().take_while(|b| b.is_ascii_digit()).count();
        (n > 0).then(|| &s[n..])
    }
    let s = s.as_bytes();
    if s.is_empty() {
        return true;
    }
    let Some(mut rest) = digits(s) else {
        return false;
    };
    if let Some(r) = rest
        .strip_prefix(b"sp")
        .or_else(|| rest.strip_prefix(b"mp"))
    {
        let Some(r) = digits(r) else {
            return false;
        };
        rest = r;
    }
    if let Some(r) = rest.strip_prefix(b"V") {
        let Some(r) = digits(r) else {
            return false;
        };
        rest = r;
    }
    rest.is_empty()
}

/// Turns the fields of a finished command into its [`Command`].
fn build_command(name: &str, mut f: Fields) -> Command {
    let Some(kind) = command_kind(name) else {
        return Command::Unsupported;
    };
    if let Some(field) = f.repeated {
        return Command::Invalid {
            reason: format!("`{name}` has `{}` more than once", field.name()),
        };
    }
    build_known(kind, name, &mut f).unwrap_or_else(|reason| Command::Invalid { reason })
}

fn build_known(kind: Kind, name: &str, f: &mut Fields) -> Result<Command, String> {
    Ok(match kind {
        Kind::UserAdd => Command::UserAdd(UserProfile {
            service_provider_id: f.required(Field::ServiceProviderId, name)?,
            group_id: f.required(Field::GroupId, name)?,
            user_id: f.required(Field::UserId, name)?,
            first_name: f.required(Field::FirstName, name)?,
            last_name: f.required(Field::LastName, name)?,
            phone_number: f.optional(Field::PhoneNumber),
            extension: f.optional(Field::Extension),
            mobile_phone_number: f.optional(Field::MobilePhoneNumber),
            email_address: f.optional(Field::EmailAddress),
            language: f.optional(Field::Language),
            time_zone: f.optional(Field::TimeZone),
            alternate_user_id: f.optional(Field::AlternateUserId),
            is_enterprise: f.boolean(Field::IsEnterprise)?,
        }),
        Kind::UserModify => Command::UserModify(UserChanges {
            user_id: f.required(Field::UserId, name)?,
            new_user_id: f.change(Field::NewUserId),
            first_name: f.change(Field::FirstName),
            last_name: f.change(Field::LastName),
            phone_number: f.change(Field::PhoneNumber),
            extension: f.change(Field::Extension),
            mobile_phone_number: f.change(Field::MobilePhoneNumber),
            email_address: f.change(Field::EmailAddress),
            language: f.change(Field::Language),
            time_zone: f.change(Field::TimeZone),
            is_enterprise: f.boolean(Field::IsEnterprise)?,
        }),
        Kind::UserDelete => Command::UserDelete {
            user_id: f.required(Field::UserId, name)?,
        },
        Kind::ServiceAssign => Command::ServiceAssign {
            user_id: f.required(Field::UserId, name)?,
            services: std::mem::take(&mut f.services),
        },
        Kind::ServiceUnassign => Command::ServiceUnassign {
            user_id: f.required(Field::UserId, name)?,
            services: std::mem::take(&mut f.services),
        },
        Kind::IntegratedImpModify => Command::IntegratedImpModify {
            user_id: f.required(Field::UserId, name)?,
            is_active: f.boolean(Field::IsActive)?,
        },
        Kind::GroupAdd => Command::GroupAdd {
            service_provider_id: f.required(Field::ServiceProviderId, name)?,
            group_id: f.required(Field::GroupId, name)?,
            group_name: f.optional(Field::GroupName),
        },
        Kind::ServiceProviderAdd => Command::ServiceProviderAdd {
            service_provider_id: f.required(Field::ServiceProviderId, name)?,
            name: f.optional(Field::ServiceProviderName),
            is_enterprise: f.boolean(Field::IsEnterprise)?.unwrap_or(false),
        },
        Kind::GroupDelete => Command::GroupDelete {
            service_provider_id: f.required(Field::ServiceProviderId, name)?,
            group_id: f.required(Field::GroupId, name)?,
        },
        Kind::ServiceProviderDelete => Command::ServiceProviderDelete {
            service_provider_id: f.required(Field::ServiceProviderId, name)?,
        },
    })
}

/// What the text being collected belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Session { legacy: bool },
    Field(Field),
}

/// Text collection for one element: only text directly inside the element at `depth` counts.
#[derive(Debug, Clone, Copy)]
struct Capture {
    target: Target,
    depth: usize,
    nil: bool,
}

/// A `command` element being read.
struct OpenCommand {
    name: String,
    echo: Option<String>,
    fields: Fields,
}

struct Parser<'i, 'l> {
    input: &'i [u8],
    encoding: Encoding,
    limits: &'l ParseLimits,
    invalid_at: usize,
    reader: NsReader<&'i [u8]>,
    /// Open elements, root included.
    depth: usize,
    root: RootState,
    session: Option<Session>,
    commands: Vec<Request>,
    command: Option<OpenCommand>,
    capture: Option<Capture>,
    text: String,
}

impl<'i> Parser<'i, '_> {
    fn run(&mut self) -> Result<Document, ParseErrorKind> {
        loop {
            // Events are contiguous (text is not trimmed), so where the reader stands before an
            // event is where that event starts: the `<` of a tag, the `&` of a reference.
            let start = self.reader.buffer_position() as usize;
            // Only the root's namespace matters (children are matched by local name), so
            // elements are resolved in `open_root`, not on every event.
            let event = match self.reader.read_event() {
                Ok(event) => event,
                Err(e) => {
                    let at = self.reader.error_position() as usize;
                    self.check_bytes_before(at)?;
                    return Err(ParseErrorKind::Syntax {
                        at: self.position(at),
                        message: e.to_string(),
                    });
                }
            };
            self.check_bytes_before(self.reader.buffer_position() as usize)?;
            match event {
                Event::Start(e) => self.open(&e, start)?,
                Event::Empty(e) => {
                    self.open(&e, start)?;
                    self.close()?;
                }
                Event::End(_) => self.close()?,
                Event::Text(t) => self.text(&t, false, start)?,
                Event::CData(t) => self.text(&t, true, start)?,
                Event::GeneralRef(r) => {
                    let at = start;
                    let ch = match r.resolve_char_ref() {
                        Ok(Some(c)) => c,
                        Ok(None) => match &*r {
                            b"amp" => '&',
                            b"lt" => '<',
                            b"gt" => '>',
                            b"apos" => '\'',
                            b"quot" => '"',
                            other => {
                                return Err(ParseErrorKind::UnknownEntity {
                                    at: self.position(at),
                                    name: String::from_utf8_lossy(other).into_owned(),
                                });
                            }
                        },
                        Err(e) => {
                            return Err(ParseErrorKind::Syntax {
                                at: self.position(at),
                                message: e.to_string(),
                            });
                        }
                    };
                    if !is_xml_char(ch) {
                        return Err(ParseErrorKind::ForbiddenCharacter {
                            at: self.position(at),
                            code: u32::from(ch),
                        });
                    }
                    self.outside_root_check(at, true)?;
                    if self.capturing() {
                        self.text.push(ch);
                        self.check_text_len(at)?;
                    }
                }
                Event::DocType(_) => {
                    return Err(ParseErrorKind::DocType {
                        at: self.position(start),
                    });
                }
                Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
                Event::Eof => return self.finish(),
            }
        }
    }

    fn finish(&mut self) -> Result<Document, ParseErrorKind> {
        // The end position is computed only for an error: it scans the whole input.
        match self.root {
            RootState::Before => Err(ParseErrorKind::Empty),
            RootState::Open => Err(ParseErrorKind::Truncated {
                at: self.position(self.input.len()),
            }),
            RootState::Closed => match self.session.take() {
                Some(session) => Ok(Document {
                    session,
                    commands: std::mem::take(&mut self.commands),
                }),
                None => Err(ParseErrorKind::MissingSession {
                    at: self.position(self.input.len()),
                }),
            },
        }
    }

    fn open(&mut self, e: &BytesStart<'i>, at: usize) -> Result<(), ParseErrorKind> {
        if self.root == RootState::Closed {
            return Err(ParseErrorKind::TrailingContent {
                at: self.position(at),
            });
        }
        self.depth += 1;
        if self.depth > self.limits.max_depth {
            return Err(ParseErrorKind::TooDeep {
                at: self.position(at),
                max: self.limits.max_depth,
            });
        }
        let local = e.local_name();
        let local = local.as_ref();
        match self.depth {
            1 => self.open_root(e, local, at),
            2 => match local {
                b"sessionId" | b"userId" if self.session.is_none() && self.commands.is_empty() => {
                    self.start_capture(
                        Target::Session {
                            legacy: local == b"userId",
                        },
                        false,
                    );
                    Ok(())
                }
                b"command" => self.open_command(e, at),
                _ => Ok(()),
            },
            3 if self.command.is_some() => {
                if let Some(field) = Field::from_name(local) {
                    let nil = self.is_nil(e, at)?;
                    self.start_capture(Target::Field(field), nil);
                }
                Ok(())
            }
            // `alternateUserId` is complex in recent releases (`AlternateUserIdEntry`): the id is
            // its own `alternateUserId` child; its `description` is not wanted.
            4 if local == b"alternateUserId"
                && self.capture.is_some_and(|c| {
                    c.target == Target::Field(Field::AlternateUserId) && c.depth == 3
                }) =>
            {
                self.start_capture(Target::Field(Field::AlternateUserId), false);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn open_root(
        &mut self,
        e: &BytesStart<'i>,
        local: &[u8],
        at: usize,
    ) -> Result<(), ParseErrorKind> {
        let (ns, _) = self.reader.resolve_element(e.name());
        if local != b"BroadsoftDocument"
            || !matches!(ns, ResolveResult::Bound(Namespace(OCI_NAMESPACE)))
        {
            let namespace = match ns {
                ResolveResult::Bound(Namespace(n)) => format!("`{}`", String::from_utf8_lossy(n)),
                ResolveResult::Unbound => "none".to_owned(),
                ResolveResult::Unknown(p) => {
                    format!("of undeclared prefix `{}`", String::from_utf8_lossy(&p))
                }
            };
            return Err(ParseErrorKind::WrongRoot {
                at: self.position(at),
                found: String::from_utf8_lossy(e.name().as_ref()).into_owned(),
                namespace,
            });
        }
        let mut protocol = None;
        for attr in e.attributes() {
            let attr = attr.map_err(|err| self.syntax_at(at, err))?;
            if attr.key.as_ref() == b"protocol" {
                protocol = Some(self.attribute_value(&attr.value, at)?.into_owned());
            }
        }
        match protocol.as_deref() {
            Some("OCI") => {
                self.root = RootState::Open;
                Ok(())
            }
            Some(other) => Err(ParseErrorKind::WrongProtocol {
                at: self.position(at),
                found: format!("`{other}`"),
            }),
            None => Err(ParseErrorKind::WrongProtocol {
                at: self.position(at),
                found: "missing".to_owned(),
            }),
        }
    }

    fn open_command(&mut self, e: &BytesStart<'i>, at: usize) -> Result<(), ParseErrorKind> {
        if self.session.is_none() {
            return Err(ParseErrorKind::MissingSession {
                at: self.position(at),
            });
        }
        if self.commands.len() >= self.limits.max_commands {
            return Err(ParseErrorKind::TooManyCommands {
                at: self.position(at),
                max: self.limits.max_commands,
            });
        }
        let mut name = None;
        let mut echo = None;
        for attr in e.attributes() {
            let attr = attr.map_err(|err| self.syntax_at(at, err))?;
            if attr.key.as_ref() == b"echo" {
                echo = Some(self.attribute_value(&attr.value, at)?.into_owned());
            } else if self.is_xsi(attr.key, b"type") {
                let value = self.attribute_value(&attr.value, at)?;
                // The prefix (`c:UserAddRequest`) names the OCI namespace; the local part is the type.
                let local = value.rsplit(':').next().unwrap_or_default().trim();
                name = Some(local.to_owned());
            }
        }
        match name {
            Some(name) if !name.is_empty() => {
                self.command = Some(OpenCommand {
                    name,
                    echo,
                    fields: Fields::default(),
                });
                Ok(())
            }
            _ => Err(ParseErrorKind::MissingXsiType {
                at: self.position(at),
            }),
        }
    }

    /// Whether an attribute is `xsi:<local>`. An undeclared `xsi` prefix is accepted too: the intent
    /// is unambiguous and some senders forget the declaration.
    fn is_xsi(&self, key: quick_xml::name::QName<'_>, local: &[u8]) -> bool {
        let (ns, name) = self.reader.resolve_attribute(key);
        name.as_ref() == local
            && match ns {
                ResolveResult::Bound(Namespace(n)) => n == XSI,
                ResolveResult::Unknown(p) => p == b"xsi",
                ResolveResult::Unbound => false,
            }
    }

    fn is_nil(&self, e: &BytesStart<'i>, at: usize) -> Result<bool, ParseErrorKind> {
        // Fields nearly never carry attributes: skip setting up the (checking) iterator.
        if e.attributes_raw().is_empty() {
            return Ok(false);
        }
        for attr in e.attributes() {
            let attr = attr.map_err(|err| self.syntax_at(at, err))?;
            if self.is_xsi(attr.key, b"nil") {
                let v = self.attribute_value(&attr.value, at)?;
                return Ok(matches!(v.trim(), "true" | "1"));
            }
        }
        Ok(false)
    }

    /// Borrowed from `raw` unless decoding or unescaping had to build a new string.
    fn attribute_value<'a>(
        &self,
        raw: &'a [u8],
        at: usize,
    ) -> Result<Cow<'a, str>, ParseErrorKind> {
        let decoded = self
            .encoding
            .decode(raw)
            .map_err(|()| self.invalid_bytes(at))?;
        let unescaped = match decoded {
            Cow::Borrowed(s) => quick_xml::escape::unescape(s),
            Cow::Owned(s) => quick_xml::escape::unescape(&s).map(|v| Cow::Owned(v.into_owned())),
        };
        match unescaped {
            Ok(v) => {
                self.check_chars(&v, at)?;
                Ok(v)
            }
            Err(e) => Err(ParseErrorKind::Syntax {
                at: self.position(at),
                message: e.to_string(),
            }),
        }
    }

    fn start_capture(&mut self, target: Target, nil: bool) {
        self.text.clear();
        self.capture = Some(Capture {
            target,
            depth: self.depth,
            nil,
        });
    }

    fn capturing(&self) -> bool {
        self.capture.is_some_and(|c| c.depth == self.depth)
    }

    fn close(&mut self) -> Result<(), ParseErrorKind> {
        if let Some(capture) = self.capture.filter(|c| c.depth == self.depth) {
            self.capture = None;
            let value = self.text.trim();
            match capture.target {
                Target::Session { legacy } => {
                    if !value.is_empty() {
                        let value = value.to_owned();
                        self.session = Some(if legacy {
                            Session::UserId(value)
                        } else {
                            Session::SessionId(value)
                        });
                    }
                }
                Target::Field(field) => {
                    let value = if capture.nil {
                        Value::Nil
                    } else {
                        Value::Text(value.to_owned())
                    };
                    if let Some(command) = self.command.as_mut() {
                        command.fields.set(field, value);
                    }
                }
            }
        }
        match self.depth {
            2 => {
                if let Some(OpenCommand { name, echo, fields }) = self.command.take() {
                    let command = build_command(&name, fields);
                    self.commands.push(Request {
                        name,
                        echo,
                        command,
                    });
                }
            }
            1 => {
                self.root = RootState::Closed;
                if self.commands.is_empty() {
                    let at = self.position(self.reader.buffer_position() as usize);
                    return Err(if self.session.is_none() {
                        ParseErrorKind::MissingSession { at }
                    } else {
                        ParseErrorKind::NoCommands { at }
                    });
                }
            }
            _ => {}
        }
        self.depth = self.depth.saturating_sub(1);
        Ok(())
    }

    fn text(&mut self, raw: &[u8], cdata: bool, at: usize) -> Result<(), ParseErrorKind> {
        self.outside_root_check(at, cdata || !raw.iter().all(u8::is_ascii_whitespace))?;
        if self.capturing() {
            let from = self.text.len();
            self.encoding
                .decode_into(raw, &mut self.text)
                .map_err(|()| self.invalid_bytes(at))?;
            self.check_chars(&self.text[from..], at)?;
            self.check_text_len(at)?;
        }
        Ok(())
    }

    /// XML 1.0 `Char`: a value holding anything else could not be written back (the writer
    /// replaces such characters), so it is refused where it is read.
    fn check_chars(&self, text: &str, at: usize) -> Result<(), ParseErrorKind> {
        // Printable ASCII is the common case and needs no char decoding.
        if text
            .bytes()
            .all(|b| matches!(b, b'\t' | b'\n' | b'\r' | 0x20..=0x7E))
        {
            return Ok(());
        }
        match text.chars().find(|c| !is_xml_char(*c)) {
            Some(c) => Err(ParseErrorKind::ForbiddenCharacter {
                at: self.position(at),
                code: u32::from(c),
            }),
            None => Ok(()),
        }
    }

    /// Text outside the root element is not allowed; whitespace is.
    fn outside_root_check(&self, at: usize, significant: bool) -> Result<(), ParseErrorKind> {
        match self.root {
            RootState::Open => Ok(()),
            _ if !significant => Ok(()),
            RootState::Closed => Err(ParseErrorKind::TrailingContent {
                at: self.position(at),
            }),
            RootState::Before => Err(ParseErrorKind::Syntax {
                at: self.position(at),
                message: "text before the root element".to_owned(),
            }),
        }
    }

    fn check_text_len(&self, at: usize) -> Result<(), ParseErrorKind> {
        if self.text.len() > self.limits.max_text_len {
            return Err(ParseErrorKind::TextTooLong {
                at: self.position(at),
                max: self.limits.max_text_len,
            });
        }
        Ok(())
    }

    /// Reports bytes the declared encoding cannot carry once the reader has gone past them.
    fn check_bytes_before(&self, consumed: usize) -> Result<(), ParseErrorKind> {
        if consumed > self.invalid_at {
            return Err(self.invalid_bytes(self.invalid_at));
        }
        Ok(())
    }

    fn invalid_bytes(&self, at: usize) -> ParseErrorKind {
        ParseErrorKind::InvalidBytes {
            at: self.position(at.min(self.invalid_at)),
            encoding: self.encoding.label(),
        }
    }

    fn syntax_at(&self, at: usize, err: impl fmt::Display) -> ParseErrorKind {
        ParseErrorKind::Syntax {
            at: self.position(at),
            message: err.to_string(),
        }
    }

    fn position(&self, offset: usize) -> Position {
        position(self.input, offset, self.encoding)
    }
}

/// Line and column (characters, 1-based) of a byte offset. Only computed on errors.
fn position(input: &[u8], offset: usize, encoding: Encoding) -> Position {
    let before = &input[..offset.min(input.len())];
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let this_line = &before[line_start..];
    let chars = match encoding {
        Encoding::Latin1 => this_line.len(),
        // Count everything but UTF-8 continuation bytes.
        Encoding::Utf8 | Encoding::Ascii => this_line.iter().filter(|&&b| b & 0xC0 != 0x80).count(),
    };
    Position {
        line: u32::try_from(line).unwrap_or(u32::MAX),
        column: u32::try_from(chars + 1).unwrap_or(u32::MAX),
    }
}

/// Elements whose content is a secret; matched on the lower-cased local name.
/// XML 1.0 production `Char` (Rust's `char` already excludes the surrogates).
fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{FFFD}' | '\u{10000}'..)
}

fn is_secret_element(local: &str) -> bool {
    let l = local.to_ascii_lowercase();
    ["password", "passcode", "accesscode", "secret", "token"]
        .iter()
        .any(|s| l.contains(s))
}

/// The first `max` bytes of a body as text for the operator's audit, with the content of
/// `password`, `passcode`, `newPassword`, `accessCode`, … elements replaced by `[redacted]`.
/// Works on anything (truncated, malformed, binary); ISO-8859-1 is honoured when declared.
pub fn redacted_excerpt(bytes: &[u8], max: usize) -> String {
    let cut = &bytes[..bytes.len().min(max)];
    let text = match sniff_encoding(cut.strip_prefix(UTF8_BOM).unwrap_or(cut)) {
        Ok(Encoding::Latin1) => cut.iter().map(|&b| char::from(b)).collect(),
        _ => String::from_utf8_lossy(cut).into_owned(),
    };
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(lt) = rest.find('<') {
        out.push_str(&rest[..lt]);
        rest = &rest[lt..];
        let Some(gt) = rest.find('>') else {
            break;
        };
        let tag = &rest[..=gt];
        out.push_str(tag);
        rest = &rest[gt + 1..];
        let name_part = tag[1..tag.len() - 1].trim_start();
        let self_closing = tag.ends_with("/>");
        if name_part.starts_with(['/', '?', '!']) || self_closing {
            continue;
        }
        let qname = name_part
            .split(|c: char| c.is_whitespace() || c == '/')
            .next()
            .unwrap_or_default();
        let local = qname.rsplit(':').next().unwrap_or_default();
        if !is_secret_element(local) {
            continue;
        }
        // Redact up to the next tag, or a whole CDATA section, or to the end if truncated.
        let secret_end = if let Some(cdata) = rest.strip_prefix("<![CDATA[") {
            cdata
                .find("]]>")
                .map_or(rest.len(), |i| i + "<![CDATA[".len() + 3)
        } else {
            rest.find('<').unwrap_or(rest.len())
        };
        if secret_end > 0 {
            out.push_str("[redacted]");
        }
        rest = &rest[secret_end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_suffix_rule() {
        for ok in [
            "", "17sp4", "22V2", "22", "13mp2", "14sp9", "23V10", "21sp1V2",
        ] {
            assert!(is_release_suffix(ok), "{ok}");
        }
        for bad in [
            "Foo", "17sp", "V2", "sp4", "22v2", "17sp4x", "22V", "-1", "17 sp4",
        ] {
            assert!(!is_release_suffix(bad), "{bad}");
        }
        assert_eq!(command_kind("UserAddRequest17sp4"), Some(Kind::UserAdd));
        assert_eq!(
            command_kind("ServiceProviderAddRequest13mp2"),
            Some(Kind::ServiceProviderAdd)
        );
        assert_eq!(command_kind("UserAddRequestFoo"), None);
        assert_eq!(command_kind("UserAdd"), None);
        assert_eq!(command_kind("GroupDnGetListRequest"), None);
    }

    #[test]
    fn encoding_sniffing() {
        assert_eq!(
            sniff_encoding(b"<?xml version='1.0' encoding='ISO-8859-1'?><a/>"),
            Ok(Encoding::Latin1)
        );
        assert_eq!(
            sniff_encoding(b"<?xml version=\"1.0\" encoding = \"utf-8\"?><a/>"),
            Ok(Encoding::Utf8)
        );
        assert_eq!(
            sniff_encoding(b"<?xml version=\"1.0\"?><a/>"),
            Ok(Encoding::Utf8)
        );
        assert_eq!(sniff_encoding(b"<a/>"), Ok(Encoding::Utf8));
        assert!(matches!(
            sniff_encoding(b"<?xml version='1.0' encoding='Shift_JIS'?><a/>"),
            Err(ParseErrorKind::UnsupportedEncoding { declared }) if declared == "Shift_JIS"
        ));
        assert!(sniff_encoding(b"\xFF\xFE<\0a\0").is_err());
    }

    #[test]
    fn positions_count_characters() {
        let input = "ab\ncdé<x".as_bytes();
        assert_eq!(
            position(input, input.len() - 2, Encoding::Utf8),
            Position { line: 2, column: 4 }
        );
        assert_eq!(
            position(b"\xe9\xe9<", 2, Encoding::Latin1),
            Position { line: 1, column: 3 }
        );
        assert_eq!(
            position(b"abc", 99, Encoding::Utf8),
            Position { line: 1, column: 4 }
        );
    }

    #[test]
    fn excerpt_redacts_secrets_even_when_truncated() {
        let doc = b"<a><password>S3cret</password><c:newPassword x='1'><![CDATA[p<w]]></c:newPassword><passcode/><userId>u</userId><accessCode>12";
        let out = redacted_excerpt(doc, 1000);
        assert!(
            !out.contains("S3cret") && !out.contains("p<w") && !out.contains("12"),
            "{out}"
        );
        assert!(out.contains("<userId>u</userId>"), "{out}");
        assert_eq!(out.matches("[redacted]").count(), 3, "{out}");
        assert_eq!(
            redacted_excerpt(b"<password>abcdef</password>", 13),
            "<password>[redacted]"
        );
        assert_eq!(redacted_excerpt("é".as_bytes(), 1), "\u{FFFD}");
    }
}
