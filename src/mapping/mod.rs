//! Mapping: templates, packages, locales, phone numbers and time zones — OCI-P commands in, typed
//! Webex plans out.
//!
//! Pure functions only: this module imports no I/O module, so every rule is tested without servers.
//! The caller logs the plan's notes and keeps the state (last profile, remembered template).

mod codes;
mod email;
mod locale;
mod phone;
mod plan;
mod select;
mod template;
mod timezone;

pub use codes::OciError;
pub use email::check_email;
pub use locale::{LanguageTable, is_language_code, is_supported_locale, resolve_locale};
pub use phone::phone_for_webex;
pub use plan::{
    Customer, IMP_SERVICE, MapContext, Method, Plan, ProvisionBody, Rejection, SUBSCRIBER_PATH,
    SUBSCRIBERS_PATH, UpdateBody, WebexBody, WebexCall, apply_changes, plan, uses_last_profile,
};
pub use select::{
    Selection, command_service_provider, command_user_id, remembered_template_user, select_template,
};
pub use template::{Package, Template, TemplateError, UserVerification};
pub use timezone::resolve_timezone;
