//! The typed form of an OCI-P request document and of the responses flowthrough writes.

/// A parsed request document: the session it belongs to and its commands, in document order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// The `sessionId` (or legacy `userId`) element of the envelope, copied into the response.
    pub session: Session,
    /// 1 to 15 commands, in the order the AS sent them.
    pub commands: Vec<Request>,
}

/// How the envelope identified the session; the response repeats the same element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Session {
    SessionId(String),
    UserId(String),
}

impl Session {
    pub fn value(&self) -> &str {
        match self {
            Session::SessionId(v) | Session::UserId(v) => v,
        }
    }
}

/// One `command` element of a request document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The command name from `xsi:type`, namespace prefix removed, version suffix kept
    /// (e.g. `UserAddRequest17sp4`).
    pub name: String,
    /// The `echo` attribute, copied verbatim into the matching response.
    pub echo: Option<String>,
    pub command: Command,
}

/// What a command asks for, independent of its OCI-P release suffix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `UserAddRequest*`.
    UserAdd(UserProfile),
    /// `UserModifyRequest*`.
    UserModify(UserChanges),
    /// `UserDeleteRequest`.
    UserDelete { user_id: String },
    /// `UserServiceAssignListRequest`: the `serviceName` values (entities unescaped).
    ServiceAssign {
        user_id: String,
        services: Vec<String>,
    },
    /// `UserServiceUnassignListRequest`.
    ServiceUnassign {
        user_id: String,
        services: Vec<String>,
    },
    /// `UserIntegratedIMPModifyRequest`; `is_active` absent means "no change".
    IntegratedImpModify {
        user_id: String,
        is_active: Option<bool>,
    },
    /// `GroupAddRequest`.
    GroupAdd {
        service_provider_id: String,
        group_id: String,
        group_name: Option<String>,
    },
    /// `ServiceProviderAddRequest*`; `is_enterprise` is true for an enterprise.
    ServiceProviderAdd {
        service_provider_id: String,
        name: Option<String>,
        is_enterprise: bool,
    },
    /// `GroupDeleteRequest`.
    GroupDelete {
        service_provider_id: String,
        group_id: String,
    },
    /// `ServiceProviderDeleteRequest`.
    ServiceProviderDelete { service_provider_id: String },
    /// A well-formed command flowthrough does not handle (answered 7002).
    Unsupported,
    /// A known command whose content is wrong: a required element missing, a boolean that is not
    /// one, … (answered 7001). The reason is operator-facing.
    Invalid { reason: String },
}

/// The user fields flowthrough reads from a `UserAddRequest*`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserProfile {
    pub service_provider_id: String,
    pub group_id: String,
    pub user_id: String,
    pub first_name: String,
    pub last_name: String,
    pub phone_number: Option<String>,
    pub extension: Option<String>,
    pub mobile_phone_number: Option<String>,
    pub email_address: Option<String>,
    pub language: Option<String>,
    pub time_zone: Option<String>,
    pub alternate_user_id: Option<String>,
    /// Patched AS releases add `isEnterprise` to the messages they send.
    pub is_enterprise: Option<bool>,
}

/// A value in a modify request: not mentioned, cleared with `xsi:nil="true"`, or set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Change<T> {
    #[default]
    Absent,
    Clear,
    Set(T),
}

impl<T> Change<T> {
    pub fn is_absent(&self) -> bool {
        matches!(self, Change::Absent)
    }
}

/// The fields of a `UserModifyRequest*`, each with its [`Change`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserChanges {
    pub user_id: String,
    /// `newUserId`: the user is being renamed.
    pub new_user_id: Change<String>,
    pub first_name: Change<String>,
    pub last_name: Change<String>,
    pub phone_number: Change<String>,
    pub extension: Change<String>,
    pub mobile_phone_number: Change<String>,
    pub email_address: Change<String>,
    pub language: Change<String>,
    pub time_zone: Change<String>,
    pub is_enterprise: Option<bool>,
}

/// One command of a response document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseCommand {
    Success { echo: Option<String> },
    Error(ErrorResponse),
}

/// `ErrorResponse`: `type` is `Error` or `Warning`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorResponse {
    pub echo: Option<String>,
    pub severity: Severity,
    pub code: u16,
    pub summary: String,
    pub summary_english: String,
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "Error",
            Severity::Warning => "Warning",
        }
    }
}
