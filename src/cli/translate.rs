//! `flowthrough translate`: the offline dry run. Prints, per command, the Webex call it would
//! cause or the OCI-P answer the AS would get (SPEC §9 for `--json`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use serde_json::{Value, json};

use super::fail;
use crate::config::Config;
use crate::mapping::{self, MapContext, Plan};
use crate::oci::{self, Command, ParseLimits, ResponseCommand, UserProfile};

#[derive(Debug, Args)]
pub struct TranslateArgs {
    /// OCI-P documents to translate, in order (a user added in one file is known to the next).
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
    /// The config: only its templates, overrides and languages are used.
    #[arg(long, short, value_name = "FILE")]
    config: PathBuf,
    /// Use this template for every command, as `POST /provisioning/{template}` does. Without
    /// it, each command's template is chosen like `POST /provisioning`: the override table by
    /// serviceProviderId, the template a user was added with earlier in this run, or
    /// `default_template`.
    #[arg(long, value_name = "NAME")]
    template: Option<String>,
    /// Print JSON (stable, for scripts) instead of text.
    #[arg(long)]
    json: bool,
}

/// What the run remembers between commands, as the store does in `serve`.
#[derive(Default)]
struct Memory {
    templates: HashMap<String, String>,
    profiles: HashMap<String, UserProfile>,
}

pub fn run(args: TranslateArgs) -> ExitCode {
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let languages = config.language_table();
    let mut memory = Memory::default();
    let mut rejected = false;
    let mut outputs = Vec::new();
    for file in &args.files {
        let bytes = match std::fs::read(file) {
            Ok(b) => b,
            Err(e) => return fail(format!("{}: cannot read: {e}", file.display())),
        };
        let result = translate_document(
            &bytes,
            &config,
            &languages,
            args.template.as_deref(),
            &mut memory,
        );
        let (output, any_rejected) = match result {
            Ok(doc) => doc,
            Err(error) => {
                let message = format!("{}: {error}", file.display());
                (
                    json!({ "file": file.display().to_string(), "error": message }),
                    true,
                )
            }
        };
        rejected |= any_rejected;
        outputs.push((file, output));
    }
    if args.json {
        let value = if outputs.len() == 1 {
            outputs.remove(0).1
        } else {
            Value::Array(outputs.into_iter().map(|(_, v)| v).collect())
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
    } else {
        for (file, output) in &outputs {
            print_text(file, output);
        }
    }
    if rejected {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}

fn translate_document(
    bytes: &[u8],
    config: &Config,
    languages: &mapping::LanguageTable,
    explicit: Option<&str>,
    memory: &mut Memory,
) -> Result<(Value, bool), oci::ParseError> {
    let document = oci::parse(bytes, &ParseLimits::default())?;
    let mut rejected = false;
    let mut commands = Vec::new();
    for (index, request) in document.commands.iter().enumerate() {
        let user_id = mapping::command_user_id(&request.command).map(str::to_owned);
        let remembered = user_id
            .as_ref()
            .and_then(|u| memory.templates.get(u))
            .cloned();
        let selection = config.selection(explicit, remembered.as_deref());
        let (template_name, plan) = match mapping::select_template(&request.command, &selection) {
            Ok(name) => {
                let template = &config.templates[&name];
                let last_profile = user_id.as_ref().and_then(|u| memory.profiles.get(u));
                let ctx = MapContext {
                    template_name: &name,
                    template,
                    languages,
                    last_profile,
                };
                let plan = mapping::plan(&request.command, &ctx);
                (Some(name), plan)
            }
            Err(reject) => (None, Plan::from(reject)),
        };
        remember(memory, &request.command, template_name.as_deref());
        rejected |= matches!(plan, Plan::Reject { .. });
        let response = plan.response(request.echo.clone());
        commands.push(json!({
            "index": index,
            "command": request.name,
            "userId": plan.user_id().map(str::to_owned).or(user_id),
            "template": template_name,
            "action": plan.action(),
            "webex": plan.webex_call(),
            "response": response_json(&response),
            "notes": plan.notes(),
        }));
    }
    let template = explicit
        .map(str::to_owned)
        .or_else(|| config.default_template.clone());
    Ok((
        json!({ "template": template, "commands": commands }),
        rejected,
    ))
}

fn remember(memory: &mut Memory, command: &Command, template: Option<&str>) {
    match command {
        Command::UserAdd(profile) => {
            if let Some(t) = template {
                memory
                    .templates
                    .insert(profile.user_id.clone(), t.to_owned());
            }
            memory
                .profiles
                .insert(profile.user_id.clone(), profile.clone());
        }
        Command::UserModify(changes) => {
            if let Some(profile) = memory.profiles.get(&changes.user_id) {
                let updated = mapping::apply_changes(profile, changes);
                memory.profiles.insert(changes.user_id.clone(), updated);
            }
        }
        _ => {}
    }
}

fn response_json(response: &ResponseCommand) -> Value {
    match response {
        ResponseCommand::Success { .. } => json!({ "type": "Success" }),
        ResponseCommand::Error(e) => json!({
            "type": e.severity.as_str(),
            "errorCode": e.code,
            "summary": e.summary,
            "detail": e.detail,
        }),
    }
}

fn print_text(file: &std::path::Path, output: &Value) {
    println!("{}", file.display());
    if let Some(error) = output.get("error").and_then(Value::as_str) {
        println!("  refused: {error}");
        println!(
            "  the AS would get: ErrorResponse 7001 (or HTTP 400 when it is not OCI-P at all)"
        );
        return;
    }
    let Some(commands) = output.get("commands").and_then(Value::as_array) else {
        return;
    };
    for c in commands {
        let user = c["userId"].as_str().unwrap_or("-");
        let template = c["template"].as_str().unwrap_or("-");
        println!(
            "  [{}] {} user={} template={} → {}",
            c["index"],
            c["command"].as_str().unwrap_or("?"),
            user,
            template,
            c["action"].as_str().unwrap_or("?")
        );
        if let Some(webex) = c["webex"].as_object() {
            println!(
                "      {} {}",
                webex["method"].as_str().unwrap_or("?"),
                webex["path"].as_str().unwrap_or("?")
            );
            if !webex["body"].is_null() {
                let body = serde_json::to_string_pretty(&webex["body"]).unwrap_or_default();
                for line in body.lines() {
                    println!("      {line}");
                }
            }
        }
        let r = &c["response"];
        match r["type"].as_str() {
            Some("Success") => println!("      AS gets: SuccessResponse"),
            _ => println!(
                "      AS gets: ErrorResponse {} {}: {}",
                r["type"].as_str().unwrap_or("?"),
                r["errorCode"],
                r["detail"].as_str().or(r["summary"].as_str()).unwrap_or("")
            ),
        }
        if let Some(notes) = c["notes"].as_array() {
            for note in notes.iter().filter_map(Value::as_str) {
                println!("      note: {note}");
            }
        }
    }
}
