//! Which template a command is mapped with (SPEC §2): the one the URL names, else the override
//! for the command's serviceProviderId, else the template the user was provisioned with, else the
//! configured default.

use std::collections::BTreeMap;

use super::codes::OciError;
use super::plan::{Rejection, refusal};
use super::template::Template;
use crate::oci::Command;

/// The BroadWorks userId a command is about, if it names one.
pub fn command_user_id(command: &Command) -> Option<&str> {
    match command {
        Command::UserAdd(p) => Some(&p.user_id),
        Command::UserModify(c) => Some(&c.user_id),
        Command::UserDelete { user_id }
        | Command::ServiceAssign { user_id, .. }
        | Command::ServiceUnassign { user_id, .. }
        | Command::IntegratedImpModify { user_id, .. } => Some(user_id),
        _ => None,
    }
}

/// The serviceProviderId a command carries, if any (user commands other than UserAdd carry only
/// the userId).
pub fn command_service_provider(command: &Command) -> Option<&str> {
    match command {
        Command::UserAdd(p) => Some(&p.service_provider_id),
        Command::GroupAdd {
            service_provider_id,
            ..
        }
        | Command::ServiceProviderAdd {
            service_provider_id,
            ..
        }
        | Command::GroupDelete {
            service_provider_id,
            ..
        }
        | Command::ServiceProviderDelete {
            service_provider_id,
        } => Some(service_provider_id),
        _ => None,
    }
}

/// The user whose remembered template [`select_template`] consults for `command` under a URL
/// naming `explicit`: only a user command that carries no serviceProviderId, under a URL that
/// names no template. For every other command the caller skips the look-up (a store read per
/// UserAdd) and passes `remembered: None`; the choice is the same.
pub fn remembered_template_user<'c>(
    command: &'c Command,
    explicit: Option<&str>,
) -> Option<&'c str> {
    if explicit.is_some() || command_service_provider(command).is_some() {
        return None;
    }
    command_user_id(command)
}

/// Where the template choice came from, for the refusal message.
#[derive(Debug, Clone, Copy)]
enum Source {
    Url,
    Override,
    Remembered,
    Default,
}

/// Everything the choice depends on. `remembered` is the template the command's user was
/// provisioned with (the caller looks it up by [`remembered_template_user`]).
#[derive(Debug, Clone, Copy)]
pub struct Selection<'a> {
    /// The `{template}` of `POST /provisioning/{template}` or `translate --template`.
    pub explicit: Option<&'a str>,
    pub templates: &'a BTreeMap<String, Template>,
    /// `[template_overrides]`: serviceProviderId → template name.
    pub overrides: &'a BTreeMap<String, String>,
    pub remembered: Option<&'a str>,
    /// `default_template`.
    pub default: Option<&'a str>,
}

/// The template name for `command`, or why it is refused (turn it into a plan with `.into()`): 7004 when no configured template
/// results, and 7002/7001 for unsupported or malformed commands whatever the templates (they never
/// needed one).
pub fn select_template(command: &Command, s: &Selection) -> Result<String, Rejection> {
    if let Some(refused) = refusal(command) {
        return Err(refused);
    }
    let by_customer = || match command_service_provider(command) {
        Some(sp) => s.overrides.get(sp).map(|t| (t.as_str(), Source::Override)),
        None => s.remembered.map(|t| (t, Source::Remembered)),
    };
    let chosen = s
        .explicit
        .map(|t| (t, Source::Url))
        .or_else(by_customer)
        .or_else(|| s.default.map(|t| (t, Source::Default)));
    let Some((name, source)) = chosen else {
        return Err(Rejection {
            code: OciError::UnknownTemplate,
            message: "no template applies: the URL names none, no [template_overrides] entry or remembered template matches, and default_template is not set; POST to /provisioning/{template} or set default_template".to_owned(),
        });
    };
    if s.templates.contains_key(name) {
        return Ok(name.to_owned());
    }
    let origin = match source {
        Source::Url => "the request URL names",
        Source::Override => "[template_overrides] maps this serviceProviderId to",
        Source::Remembered => "this user was provisioned with",
        Source::Default => "default_template names",
    };
    let known: Vec<&str> = s.templates.keys().map(String::as_str).collect();
    Err(Rejection {
        code: OciError::UnknownTemplate,
        message: format!(
            "{origin} template \"{name}\", which is not configured; configured templates: {}",
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::template::tests::template;
    use crate::oci::{UserChanges, UserProfile};

    fn templates() -> BTreeMap<String, Template> {
        ["acme", "isp", "fallback"]
            .iter()
            .map(|n| (n.to_string(), template()))
            .collect()
    }

    fn overrides() -> BTreeMap<String, String> {
        BTreeMap::from([
            ("acme-ent".to_owned(), "acme".to_owned()),
            ("gone-sp".to_owned(), "gone".to_owned()),
        ])
    }

    fn user_add(sp: &str) -> Command {
        Command::UserAdd(UserProfile {
            service_provider_id: sp.into(),
            user_id: "u@x.example".into(),
            ..Default::default()
        })
    }

    fn select(
        command: &Command,
        explicit: Option<&str>,
        remembered: Option<&str>,
        default: Option<&str>,
    ) -> Result<String, Rejection> {
        let (templates, overrides) = (templates(), overrides());
        select_template(
            command,
            &Selection {
                explicit,
                templates: &templates,
                overrides: &overrides,
                remembered,
                default,
            },
        )
    }

    fn code(result: Result<String, Rejection>) -> (u16, String) {
        match result {
            Err(Rejection { code, message }) => (code.code(), message),
            other => panic!("expected a reject, got {other:?}"),
        }
    }

    #[test]
    fn the_url_template_wins() {
        assert_eq!(
            select(
                &user_add("acme-ent"),
                Some("isp"),
                Some("acme"),
                Some("fallback")
            ),
            Ok("isp".into())
        );
        let (c, m) = code(select(
            &user_add("acme-ent"),
            Some("nope"),
            None,
            Some("fallback"),
        ));
        assert_eq!(c, 7004);
        assert!(
            m.contains("\"nope\"") && m.contains("URL") && m.contains("acme, fallback, isp"),
            "{m}"
        );
    }

    #[test]
    fn commands_with_a_service_provider_use_the_override_table_then_the_default() {
        assert_eq!(
            select(&user_add("acme-ent"), None, Some("isp"), Some("fallback")),
            Ok("acme".into())
        );
        assert_eq!(
            select(&user_add("other"), None, Some("isp"), Some("fallback")),
            Ok("fallback".into())
        );
        let group = Command::GroupAdd {
            service_provider_id: "acme-ent".into(),
            group_id: "g".into(),
            group_name: None,
        };
        assert_eq!(select(&group, None, None, None), Ok("acme".into()));
        let del = Command::ServiceProviderDelete {
            service_provider_id: "acme-ent".into(),
        };
        assert_eq!(
            select(&del, None, None, Some("fallback")),
            Ok("acme".into())
        );
        let (c, m) = code(select(&user_add("gone-sp"), None, None, Some("fallback")));
        assert_eq!(c, 7004);
        assert!(
            m.contains("[template_overrides]") && m.contains("\"gone\""),
            "{m}"
        );
    }

    #[test]
    fn the_remembered_template_is_looked_up_exactly_when_the_choice_can_use_it() {
        let modify = Command::UserModify(UserChanges {
            user_id: "u@x.example".into(),
            ..Default::default()
        });
        let group = Command::GroupAdd {
            service_provider_id: "acme-ent".into(),
            group_id: "g".into(),
            group_name: None,
        };
        for command in [user_add("acme-ent"), user_add("other"), modify, group] {
            for explicit in [None, Some("isp")] {
                let chosen = |remembered| select(&command, explicit, remembered, Some("fallback"));
                let used = chosen(Some("acme")) != chosen(None);
                let looked_up = remembered_template_user(&command, explicit).is_some();
                assert_eq!(used, looked_up, "{command:?} under {explicit:?}");
            }
        }
    }

    #[test]
    fn user_only_commands_use_the_remembered_template_then_the_default() {
        let modify = Command::UserModify(UserChanges {
            user_id: "u@x.example".into(),
            ..Default::default()
        });
        let delete = Command::UserDelete {
            user_id: "u@x.example".into(),
        };
        let imp = Command::IntegratedImpModify {
            user_id: "u@x.example".into(),
            is_active: Some(true),
        };
        for cmd in [modify, delete, imp] {
            assert_eq!(
                select(&cmd, None, Some("isp"), Some("fallback")),
                Ok("isp".into())
            );
            assert_eq!(
                select(&cmd, None, None, Some("fallback")),
                Ok("fallback".into())
            );
            let (c, m) = code(select(&cmd, None, Some("removed"), Some("fallback")));
            assert_eq!(c, 7004);
            assert!(
                m.contains("provisioned with") && m.contains("\"removed\""),
                "{m}"
            );
        }
    }

    #[test]
    fn nothing_resolvable_is_7004() {
        let (c, m) = code(select(&user_add("other"), None, None, None));
        assert_eq!(c, 7004);
        assert!(m.contains("default_template"));
        let (c, m) = code(select(&user_add("other"), None, None, Some("missing")));
        assert_eq!(c, 7004);
        assert!(
            m.contains("default_template names template \"missing\""),
            "{m}"
        );
    }

    #[test]
    fn unsupported_and_invalid_commands_are_refused_before_any_template() {
        assert_eq!(
            code(select(&Command::Unsupported, None, None, None)).0,
            7002
        );
        assert_eq!(
            code(select(
                &Command::Invalid {
                    reason: "bad".into()
                },
                Some("nope"),
                None,
                None
            ))
            .0,
            7001
        );
    }

    #[test]
    fn command_identifiers() {
        assert_eq!(command_user_id(&user_add("sp")), Some("u@x.example"));
        assert_eq!(command_service_provider(&user_add("sp")), Some("sp"));
        let assign = Command::ServiceAssign {
            user_id: "v".into(),
            services: vec![],
        };
        assert_eq!(
            (command_user_id(&assign), command_service_provider(&assign)),
            (Some("v"), None)
        );
        let group = Command::GroupDelete {
            service_provider_id: "sp".into(),
            group_id: "g".into(),
        };
        assert_eq!(
            (command_user_id(&group), command_service_provider(&group)),
            (None, Some("sp"))
        );
        assert_eq!(
            (
                command_user_id(&Command::Unsupported),
                command_service_provider(&Command::Unsupported)
            ),
            (None, None)
        );
    }
}
