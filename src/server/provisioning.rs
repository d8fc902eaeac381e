//! `POST /provisioning[/{template}]`: one OCI-P document in, one OCI-P document out.
//!
//! A request goes through named stages, each handing plain data to the next: [`admit`],
//! [`parse`], [`choose_templates`], [`map_and_store`] (the durable accept), then, in a task that
//! outlives the request ([`conclude`]), [`wait`] for the outcomes up to the ack deadline and
//! [`answer`]. A stage before the accept may end the request itself (a refusal, or one OCI-P
//! error for the whole document); from the accept on, every command is answered: by its outcome,
//! or 7020 at the deadline while delivery continues in the background.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderMap};
use actix_web::{HttpRequest, HttpResponse, web};
use tracing::Instrument;

use super::AppState;
use crate::delivery::{Engine, Finished, HereSlot};
use crate::mapping::{self, MapContext, OciError, Plan, Rejection};
use crate::oci::{
    self, Command, Document, ErrorClass, ParseLimits, Request, ResponseCommand, Session,
};
use crate::secret::BasicCredentials;
use crate::store::{
    AuditEvent, AuditKey, AuditRecord, Call, Claim, Customer, EntryId, EntryState, NewEntry,
    Origin, Remembered, Store, StoreError, now_ms,
};
use crate::trace::Timeline;

/// The longest an answer waits for its audit records (see [`answer`]).
const AUDIT_WAIT: Duration = Duration::from_millis(250);

/// How much of a document the audit keeps when flowthrough cannot use it.
const EXCERPT_BYTES: usize = 64 * 1024;

/// The first look at a waiting command's stored outcome on a shared store, after its accept.
/// Another node holding the user's lane delivers it as soon as its current Webex call ends, so
/// the outcome can be there within tens of milliseconds; the AS should not wait much longer.
const FIRST_STORE_LOOK: Duration = Duration::from_millis(50);

/// The longest pause between looks, which double from [`FIRST_STORE_LOOK`]: a command that waits
/// seconds (a slow Webex, a lane held by a busy node) costs the database five reads a second,
/// not twenty, and its answer comes at most this late.
const LONGEST_STORE_LOOK: Duration = Duration::from_millis(200);

/// Basic credentials from the request, if any.
fn basic_credentials(headers: &HeaderMap) -> Option<BasicCredentials> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    BasicCredentials::parse(value)
}

fn content_type_ok(req: &HttpRequest) -> bool {
    let Some(value) = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let media = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    media == "text/xml" || media == "application/xml"
}

fn plain(status: StatusCode, message: &str) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("text/plain; charset=utf-8")
        .body(format!("{message}\n"))
}

fn oci_reply(session: &Session, responses: &[ResponseCommand]) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/xml; charset=UTF-8")
        .body(oci::write(session, responses))
}

/// What a stage hands to the next, or the request's answer when the stage ends it early (boxed:
/// a response is large to move through every stage's result, and ending early is the rare path).
type Stage<T> = Result<T, Box<HttpResponse>>;

/// The end of a stored command, when delivery reaches it.
type Watch = tokio::sync::oneshot::Receiver<Finished>;

/// What one command came to before delivery.
enum Step {
    /// Answered without Webex.
    Answered(ResponseCommand),
    /// Stored in the outbox; answered when delivered, dead, or at the deadline.
    Queued {
        id: EntryId,
        /// The answer once Webex accepted it (Success, or 7021 for uncarried changes).
        on_delivery: ResponseCommand,
        echo: Option<String>,
    },
}

/// Where a command's audit record stands when its answer is decided.
enum Audit {
    /// Not written: a command refused before the store, written with its answer.
    Unwritten,
    /// Written with the accept, final: the command was answered then (no Webex call).
    Final,
    /// Written with the accept as `accepted`; the answer completes it.
    Accepted(AuditKey),
}

/// A command of the document and what it came to, owned: the answer and the audit record are
/// made by a task that outlives the request when the AS hangs up (see [`conclude`]).
struct CommandStep {
    command: AboutCommand,
    step: Step,
    audit: Audit,
}

/// What the answer and the audit say of a command besides its outcome.
struct AboutCommand {
    name: String,
    kind: &'static str,
    user_id: Option<String>,
    template: Option<String>,
}

impl CommandStep {
    /// A command answered before the store: its record is written with the answer.
    fn new(request: &Request, template: Option<String>, step: Step) -> CommandStep {
        CommandStep {
            command: AboutCommand::of(request, template),
            step,
            audit: Audit::Unwritten,
        }
    }
}

impl AboutCommand {
    fn of(request: &Request, template: Option<String>) -> AboutCommand {
        AboutCommand {
            name: request.name.clone(),
            kind: command_kind(&request.command),
            user_id: mapping::command_user_id(&request.command).map(str::to_owned),
            template,
        }
    }

    /// Its audit record, answered as `outcome`.
    fn record(&self, at_ms: u64, client: &str, outcome: String, end: CommandEnd) -> AuditRecord {
        AuditRecord {
            at_ms,
            client: client.to_owned(),
            event: AuditEvent::Command {
                template: self.template.clone(),
                command: self.name.clone(),
                user_id: self.user_id.clone(),
                outcome,
                webex_status: end.webex_status,
                tracking_id: end.tracking_id,
                outbox_id: end.outbox_id,
                latency_ms: end.latency_ms,
            },
        }
    }
}

/// What an audit record says of a command's end beyond its outcome.
#[derive(Default)]
struct CommandEnd {
    webex_status: Option<String>,
    tracking_id: Option<String>,
    outbox_id: Option<EntryId>,
    latency_ms: u64,
}

/// The outcome of a stored command's audit record until it is answered: it stays if the
/// answer's completion of the record is lost (a crash), and the outbox entry it names says how
/// the command ended.
const ACCEPTED: &str = "accepted";

/// A stored command's user, for delivery: on the slot reserved for it on this thread (with the
/// user's lane as its accept claimed it, if it did), or handed to the engine.
struct Delivery {
    user: String,
    here: Option<(HereSlot, Option<Claim>)>,
}

/// What the durable accept hands to the rest of the request, none of which needs the AS.
struct Accepted {
    /// Every command of the document, in order.
    steps: Vec<CommandStep>,
    /// Each stored command's delivery.
    deliveries: Vec<Delivery>,
    /// The stored commands' ends, watched before they were stored.
    watches: Vec<Watched>,
}

/// A stored command the request waits for: the engine's watch of its entry, and its user (on a
/// shared store the request also reads the user's queue, which another node may hold behind a
/// dead entry).
struct Watched {
    id: EntryId,
    user: String,
    end: Watch,
}

pub async fn handle(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<AppState>,
    path: Option<web::Path<String>>,
) -> HttpResponse {
    let started = Instant::now();
    let template = path.as_deref().map(String::as_str);
    let client = super::client_label(&req);
    let span = tracing::info_span!(
        "provisioning",
        client = %client,
        template = template.unwrap_or("-"),
    );
    let mut timeline = Timeline::new(started);
    let mut response = process(&req, client, &body, &state, template, &mut timeline)
        .instrument(span)
        .await
        .unwrap_or_else(|answered_early| *answered_early);
    let ended = Instant::now();
    state.traces.record(&timeline, ended);
    state
        .metrics
        .request_seconds
        .observe((ended - started).as_secs_f64());
    if crate::listener::connection_too_old(&req, state.settings.max_connection_age) {
        // actix writes `Connection: close` and closes after this response.
        response
            .head_mut()
            .set_connection_type(actix_web::http::ConnectionType::Close);
    }
    state
        .metrics
        .http_responses
        .get_or_create(&crate::metrics::StatusLabels {
            status: response.status().as_u16().to_string(),
        })
        .inc();
    response
}

/// The stages in order; each one that can end the request early does so through `?`.
async fn process(
    req: &HttpRequest,
    client: String,
    body: &[u8],
    state: &web::Data<AppState>,
    explicit: Option<&str>,
    timeline: &mut Timeline,
) -> Stage<HttpResponse> {
    let engine = admit(req, state)?;
    let document = parse(state, &client, body).await?;
    timeline.parsed(Instant::now());
    let chosen = choose_templates(req.headers(), state, &document, explicit).await?;
    let accepted = map_and_store(state, engine, &client, body, &document, chosen, timeline).await?;
    timeline.mapped(Instant::now());

    // From here on nothing depends on the AS still listening. Once stored, a command must reach
    // delivery and its audit record must be written even if the AS hangs up and actix drops this
    // future: the benchmark's generator, stopping with requests in flight, left stored commands
    // undelivered until a restart that way, and their audit records were never written.
    let concluding = actix_rt::spawn(
        conclude(
            state.clone(),
            engine.clone(),
            accepted,
            client,
            timeline.clone(),
        )
        .in_current_span(),
    );
    Ok(match concluding.await {
        Ok((concluded, Ok(responses))) => {
            *timeline = concluded;
            oci_reply(&document.session, &responses)
        }
        Ok((_, Err(e))) => {
            tracing::error!(error = %e, "cannot flush the store");
            plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "the store cannot be flushed to disk; the AS should retry — check the data volume",
            )
        }
        Err(e) => {
            tracing::error!(error = %e, "the task concluding a request ended early");
            plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "flowthrough could not conclude the request; the AS should retry (a command that was stored is delivered once, whatever the retry)",
            )
        }
    })
}

/// Refuse, before any work, a request this node cannot accept commands from: a node without a
/// delivery engine (tunnel only) or shutting down sends the AS elsewhere, a store that cannot be
/// written would refuse every command anyway, and only an XML body can be an OCI-P document.
/// Hands on the engine the accepted commands go to.
fn admit<'s>(req: &HttpRequest, state: &'s AppState) -> Stage<&'s Engine> {
    let Some(engine) = &state.engine else {
        return Err(Box::new(plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "this node runs no provisioning listener",
        )));
    };
    if state.shutting_down() {
        return Err(Box::new(plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "flowthrough is shutting down; the AS should retry on another node or in a moment",
        )));
    }
    // Refused without a log line each: the write that failed was logged, `/readyz` names the
    // failure, and every later write would fail the same way.
    if state.store.write_failure().is_some() {
        return Err(Box::new(plain(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "the store cannot be written (see /status on the admin listener); nothing was accepted — {}; then the AS can retry",
                state.store.write_failure_remedy()
            ),
        )));
    }
    if !content_type_ok(req) {
        return Err(Box::new(plain(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type must be text/xml or application/xml for an OCI-P document",
        )));
    }
    Ok(engine)
}

/// Read the body as an OCI-P document within the configured size. A body flowthrough cannot use
/// ends the request here (too large 413, not OCI-P 400, malformed OCI-P one 7001) and is kept in
/// the audit for the operator to study. Hands on the typed document.
async fn parse(state: &AppState, client: &str, body: &[u8]) -> Stage<Document> {
    let limits = ParseLimits {
        max_bytes: state.settings.max_body_bytes,
        ..ParseLimits::default()
    };
    let error = match oci::parse(body, &limits) {
        Ok(document) => return Ok(document),
        Err(error) => error,
    };
    keep_document(state, client, &error.to_string(), body).await;
    // Durable before the AS hears of it, as every other record is (a document that only reached
    // the page cache is gone after a power cut).
    if let Err(e) = state.store.flush().await {
        tracing::warn!(error = %e, "cannot flush the kept document to the store");
    }
    Err(Box::new(match error.class() {
        ErrorClass::TooLarge => plain(StatusCode::PAYLOAD_TOO_LARGE, &error.to_string()),
        ErrorClass::NotOci => plain(
            StatusCode::BAD_REQUEST,
            &format!("not an OCI-P document: {error}"),
        ),
        ErrorClass::Malformed => {
            let session = error
                .session()
                .cloned()
                .unwrap_or_else(|| Session::SessionId(String::new()));
            let response = OciError::Malformed.response(None, Some(error.to_string()));
            state.metrics.count_command("document", "error_7001");
            oci_reply(&session, &[response])
        }
    }))
}

/// Choose every command's template, and check the provisioning account it asks for, before
/// anything is stored: a document refused 401 comes again with the credentials, and its first
/// commands must not wait in the outbox meanwhile (stored, never handed to delivery). Hands on
/// one choice per command, in order: a configured template's name, or why the command is refused.
async fn choose_templates(
    headers: &HeaderMap,
    state: &AppState,
    document: &Document,
    explicit: Option<&str>,
) -> Stage<Vec<Result<String, Rejection>>> {
    let config = &state.config;
    let credentials = basic_credentials(headers);
    let mut chosen = Vec::with_capacity(document.commands.len());
    // The templates this document's own UserAdds give their users, as the store will remember
    // them by the time a later command of the document is mapped.
    let mut added_here: HashMap<&str, &str> = HashMap::new();
    for request in &document.commands {
        let remembered = match mapping::remembered_template_user(&request.command, explicit) {
            Some(user) => match added_here.get(user) {
                Some(template) => Some((*template).to_owned()),
                None => state
                    .store
                    .user(user)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|u| u.template),
            },
            None => None,
        };
        let selection = config.selection(explicit, remembered.as_deref());
        let choice = mapping::select_template(&request.command, &selection);
        if let Ok(name) = &choice
            && let Some((template_name, template)) = config.templates.get_key_value(name)
        {
            if let Some(account) = &template.provisioning_account
                && !account.verify(credentials.as_ref())
            {
                return Err(Box::new(HttpResponse::Unauthorized()
                    .insert_header((
                        header::WWW_AUTHENTICATE,
                        format!("Basic realm=\"flowthrough {template_name}\", charset=\"UTF-8\""),
                    ))
                    .content_type("text/plain; charset=utf-8")
                    .body(format!(
                        "template \"{template_name}\" requires the provisioning account's HTTP Basic credentials; configure them on the AS\n"
                    ))));
            }
            if let Command::UserAdd(profile) = &request.command {
                added_here.insert(&profile.user_id, template_name);
            }
        }
        chosen.push(choice);
    }
    Ok(chosen)
}

/// The 503 of a store that refused a command's write: nothing of the command was accepted.
fn store_refused(state: &AppState) -> HttpResponse {
    plain(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!(
            "the store cannot be written, so nothing was acknowledged — {}; then the AS can send the commands again (one whose write was cut off as it committed may already be stored: it is delivered once, and sending it again is safe)",
            state.store.write_failure_remedy()
        ),
    )
}

/// Map each command through its template and store what it leaves: the durable accept, after
/// which the command is flowthrough's to deliver. A command that needs no Webex call (refused,
/// a customer record, a no-op) is answered now; one that does is stored in the outbox, watched
/// before it is stored. A write the store refuses ends the request 503. Hands on every
/// command's step, and the users and watches of the stored ones.
async fn map_and_store(
    state: &AppState,
    engine: &Engine,
    client: &str,
    body: &[u8],
    document: &Document,
    chosen: Vec<Result<String, Rejection>>,
    timeline: &mut Timeline,
) -> Stage<Accepted> {
    let mut steps = Vec::with_capacity(document.commands.len());
    let mut deliveries: Vec<Delivery> = Vec::new();
    // Watched before stored: the engine may take an entry up as soon as it is stored, before
    // this request is done (its user's previous entry ends), and a watch set before then leaves
    // it no window to end unseen.
    let mut watches = Vec::new();
    for (request, choice) in document.commands.iter().zip(chosen) {
        let template_name = match choice {
            Ok(name) => name,
            Err(reject) => {
                if matches!(request.command, Command::Unsupported) {
                    keep_document(
                        state,
                        client,
                        &format!("unsupported command {}", request.name),
                        body,
                    )
                    .await;
                }
                steps.push(CommandStep::new(
                    request,
                    None,
                    Step::Answered(Plan::from(reject).response(request.echo.clone())),
                ));
                continue;
            }
        };
        let Some(template) = state.config.templates.get(&template_name) else {
            // select_template only returns configured names; answer rather than drop a command.
            let response = OciError::UnknownTemplate.response(request.echo.clone(), None);
            steps.push(CommandStep::new(request, None, Step::Answered(response)));
            continue;
        };
        let user_id = mapping::command_user_id(&request.command).map(str::to_owned);
        let last_profile = match &user_id {
            Some(user) if mapping::uses_last_profile(&request.command) => {
                state.store.profile(user).await.ok().flatten()
            }
            _ => None,
        };
        let ctx = MapContext {
            template_name: &template_name,
            template,
            languages: &state.languages,
            last_profile: last_profile.as_ref(),
        };
        let plan = mapping::plan(&request.command, &ctx);
        for note in plan.notes() {
            tracing::info!(command = %request.name, user_id = user_id.as_deref().unwrap_or(""), "{note}");
        }
        let (remembered, call) =
            match what_to_keep(request, &template_name, last_profile.as_ref(), &plan) {
                Ok(kept) => kept,
                Err(e) => {
                    tracing::error!(error = %e, "cannot encode a command for the store");
                    return Err(Box::new(store_refused(state)));
                }
            };
        let user = plan.user_id().unwrap_or_default().to_owned();
        let queued = call.is_some();
        let about = AboutCommand::of(request, Some(template_name.clone()));
        let response = plan.response(request.echo.clone());
        // The record goes in with the command: `accepted` for one that waits for Webex (the
        // store names its entry), the final one for a command answered here.
        let at_ms = now_ms();
        let (outcome, latency_ms) = if queued {
            (ACCEPTED.to_owned(), 0)
        } else {
            (outcome_label(&response), elapsed_ms(timeline.start()))
        };
        let remembered = Remembered {
            audit: Some(about.record(
                at_ms,
                client,
                outcome,
                CommandEnd {
                    latency_ms,
                    ..CommandEnd::default()
                },
            )),
            ..remembered
        };
        let entry = call.map(|call| NewEntry {
            user_id: user.clone(),
            template: template_name.clone(),
            command: request.name.clone(),
            call,
            client: client.to_owned(),
            origin: Origin::Live,
        });
        // Reserved before the command is stored, so that its lane can be claimed with it; a
        // later command of the same user in this document goes after it, through the engine.
        let here = entry
            .as_ref()
            .filter(|_| !deliveries.iter().any(|d| d.user == user))
            .and_then(|_| engine.reserve_here(&user));
        let accepting = Instant::now();
        let stored = state
            .store
            .accept(
                remembered,
                entry,
                at_ms,
                here.as_ref().map(HereSlot::claim),
                |id| {
                    watches.push(Watched {
                        id,
                        user: user.clone(),
                        end: engine.watch_new(id, &user),
                    });
                },
            )
            .await;
        timeline.accepted(accepting.elapsed());
        match stored {
            Ok(accepted) => {
                let audit = match accepted.audit {
                    Some(key) if queued => Audit::Accepted(key),
                    Some(_) => Audit::Final,
                    None => Audit::Unwritten,
                };
                let step = match accepted.entry {
                    Some(id) => {
                        deliveries.push(Delivery {
                            user,
                            here: here.map(|slot| (slot, accepted.claim)),
                        });
                        Step::Queued {
                            id,
                            on_delivery: response,
                            echo: request.echo.clone(),
                        }
                    }
                    None => Step::Answered(response),
                };
                steps.push(CommandStep {
                    command: about,
                    step,
                    audit,
                });
            }
            Err(e) => {
                engine.unwatch(watches.iter().map(|w| w.id));
                tracing::error!(error = %e, "cannot write to the store");
                return Err(Box::new(store_refused(state)));
            }
        }
    }
    Ok(Accepted {
        steps,
        deliveries,
        watches,
    })
}

/// Hand the stored commands to delivery while they are made durable, wait for their ends, wait
/// for the flush, then answer. Runs as a task of its own, which the request only awaits (see
/// [`process`]), so it ends the same whether or not the AS still listens. Hands the timeline
/// back with the answers.
async fn conclude(
    state: web::Data<AppState>,
    engine: Engine,
    accepted: Accepted,
    client: String,
    mut timeline: Timeline,
) -> (Timeline, Result<Vec<ResponseCommand>, StoreError>) {
    let started = timeline.start();
    // The commands are written, so delivery may start while they are flushed: the Webex call
    // and the flush overlap instead of following each other, and a flush that has ended by the
    // time delivery has wakes nobody. The AS still hears nothing before the flush. A crash before
    // it ends can leave a Webex call whose command the store lost, but then the AS got no answer
    // and sends the command again, and a provision sent again looks the user up first.
    let flushing = state.store.start_flush();
    for delivery in accepted.deliveries {
        match delivery.here {
            Some((slot, claimed)) => {
                actix_rt::spawn(slot.start(claimed));
            }
            None => engine.submit(&delivery.user),
        }
    }
    let deadline = tokio::time::Instant::from_std(started) + state.settings.ack_deadline;
    let finished = wait(&state, &engine, accepted.watches, deadline).await;
    timeline.woken(Instant::now());
    for end in finished.values() {
        if let Finished::Delivered {
            marks: Some(marks), ..
        } = end
        {
            timeline.delivered(*marks);
        }
    }
    // Durable before the AS hears anything. A failed flush still leaves the audit records
    // written by `answer`: delivery may already have taken the commands to Webex.
    let flushed = state.store.flushed(flushing).await;
    timeline.flushed(Instant::now());
    if let Ok(took) = &flushed {
        state
            .metrics
            .store_flush_seconds
            .observe(took.as_secs_f64());
    }
    let responses = answer(&state, accepted.steps, &finished, &client, started).await;
    timeline.audited(Instant::now());
    let concluded = flushed.map(|_| responses);
    (timeline, concluded)
}

/// Wait for the stored commands' ends up to the ack deadline, so that the AS hears Webex's
/// answer when Webex gives it in time rather than 7020. Cut short once Webex rejects the refresh
/// token: nothing is delivered without credentials, and waiting longer only turns a clear 7030
/// into a vague 7020. Hands on the ends that came, by entry.
async fn wait(
    state: &AppState,
    engine: &Engine,
    watches: Vec<Watched>,
    deadline: tokio::time::Instant,
) -> HashMap<EntryId, Finished> {
    // On a shared store another node may deliver a command (it holds the user's lane), and
    // only the store learns how it ended.
    let shared = state.settings.shared_store.then_some(&state.store);
    let watched: Option<Vec<EntryId>> = shared.map(|_| watches.iter().map(|w| w.id).collect());
    let mut finished = HashMap::new();
    if !state.credentials_invalid() {
        let deliveries = async {
            for watched in watches {
                let id = watched.id;
                if let Some(end) = end_of(watched, shared, deadline).await {
                    finished.insert(id, end);
                }
            }
        };
        let rejected = async {
            match &state.tokens {
                Some(tokens) => tokens.credentials_rejected().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = deliveries => {}
            () = rejected => {}
        }
    }
    // The engine keeps a watch until it ends the entry itself, which it never does for an
    // entry another node delivered: given up here, or each would stay for the process's life.
    if let Some(ids) = watched {
        engine.unwatch(ids);
    }
    finished
}

/// How one stored command ended, if it did by the deadline (or that it waits behind a dead
/// entry): from this node's engine, or on a shared store from the stored entries, whichever
/// tells first.
async fn end_of(
    Watched { id, user, end }: Watched,
    shared: Option<&Store>,
    deadline: tokio::time::Instant,
) -> Option<Finished> {
    let Some(store) = shared else {
        return tokio::time::timeout_at(deadline, end).await.ok()?.ok();
    };
    tokio::time::timeout_at(deadline, async {
        tokio::select! {
            Ok(end) = end => end,
            end = stored_end(store, id, &user) => end,
        }
    })
    .await
    .ok()
}

/// Look at an entry's stored progress until it has ended, more rarely as time goes on; while
/// it is pending, also at the head of its user's queue: a dead entry there holds the lane, and
/// this node's engine hears of it only if it can claim the lane (another node may hold it). A
/// read that fails counts as "not yet": the command was committed, so it is answered 7020 at
/// the deadline, never with an error.
async fn stored_end(store: &Store, id: EntryId, user: &str) -> Finished {
    let mut pause = FIRST_STORE_LOOK;
    loop {
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(LONGEST_STORE_LOOK);
        match store.progress(id).await {
            Ok(progress) => {
                if let Some(end) = progress.as_ref().and_then(Finished::of) {
                    return end;
                }
                if let Ok(Some(head)) = store.head_of(user).await
                    && head.id != id
                    && let EntryState::Dead { reason, .. } = head.state
                {
                    return Finished::Held {
                        behind: head.id,
                        reason,
                    };
                }
            }
            Err(e) => {
                tracing::debug!(entry = id, error = %e, "cannot read a waiting command's progress; looking again until the ack deadline");
            }
        }
    }
}

/// Answer each command and settle its audit record. A command answered before delivery keeps
/// its answer; a stored one is answered by its end (Webex's answer, or 7010 for a dead entry),
/// 7030 while the refresh token is rejected, else 7020 (delivery continues). Hands on the
/// answers in the document's order.
async fn answer(
    state: &AppState,
    steps: Vec<CommandStep>,
    finished: &HashMap<EntryId, Finished>,
    client: &str,
    started: Instant,
) -> Vec<ResponseCommand> {
    let credentials_invalid = state.credentials_invalid();
    let mut responses = Vec::with_capacity(steps.len());
    let mut new_records = Vec::new();
    let mut completions = Vec::new();
    for CommandStep {
        command,
        step,
        audit,
    } in steps
    {
        let (response, outbox_id) = match step {
            Step::Answered(response) => (response, None),
            Step::Queued {
                id,
                on_delivery,
                echo,
            } => {
                let response = match finished.get(&id) {
                    Some(Finished::Delivered { .. }) => on_delivery,
                    Some(Finished::Dead { reason }) => {
                        OciError::WebexRejected.response(echo, Some(reason.clone()))
                    }
                    Some(Finished::Held { behind, reason }) => OciError::Pending.response(
                        echo,
                        Some(format!(
                            "outbox entry {id} is stored but not delivered: {}",
                            Finished::held_advice(*behind, reason)
                        )),
                    ),
                    None if credentials_invalid => OciError::UpstreamCredentials.response(
                        echo,
                        Some(format!(
                            "the Webex refresh token was rejected; the command is kept in the outbox as entry {id} and is delivered once an operator installs a new token with `flowthrough token set`"
                        )),
                    ),
                    None => {
                        tracing::info!(
                            entry = id,
                            command = %command.name,
                            waited_ms = elapsed_ms(started),
                            "answered 7020: not delivered within server.ack_deadline_ms; delivery \
                             continues (see `flowthrough outbox show {id}`)"
                        );
                        OciError::Pending.response(
                            echo,
                            Some(format!("outbox entry {id}: Webex has not answered yet; delivery continues")),
                        )
                    }
                };
                (response, Some(id))
            }
        };
        let outcome = outcome_label(&response);
        state.metrics.count_command(command.kind, &outcome);
        // Delivered within the deadline: the audit gets the Webex side too.
        let (webex_status, tracking_id) = match outbox_id.and_then(|id| finished.get(&id)) {
            Some(Finished::Delivered {
                webex_status,
                tracking_id,
                ..
            }) => (webex_status.clone(), tracking_id.clone()),
            _ => (None, None),
        };
        let end = CommandEnd {
            webex_status,
            tracking_id,
            outbox_id,
            latency_ms: elapsed_ms(started),
        };
        match audit {
            Audit::Final => {}
            Audit::Unwritten => new_records.push(command.record(now_ms(), client, outcome, end)),
            Audit::Accepted(key) => {
                completions.push((key, command.record(key.at_ms, client, outcome, end)));
            }
        }
        responses.push(response);
    }
    settle_audit(state, new_records, completions).await;
    responses
}

/// Write the records of commands refused before the store, and complete those the accept
/// wrote. A completion is not waited for: the accepted record is already durable with the
/// command (SPEC §11), and the outbox entry it names says how the command ended if the
/// completion is lost. A new record is the only record of its command, so the answer waits for
/// it when the store takes it at once, as it does, but never longer than [`AUDIT_WAIT`] (a
/// database that stops answering without closing its connections kept answers the AS waits for
/// by up to a statement timeout: `bench/RESULTS.md`, power cuts of PostgreSQL). Past that the
/// records are written in the background when it answers.
async fn settle_audit(
    state: &AppState,
    new_records: Vec<AuditRecord>,
    completions: Vec<(AuditKey, AuditRecord)>,
) {
    let store = state.store.clone();
    let wait = !new_records.is_empty();
    let writing = tokio::spawn(async move {
        for record in &new_records {
            if let Err(e) = store.append_audit(record).await {
                tracing::warn!(error = %e, "cannot write an audit record");
            }
        }
        for (key, record) in &completions {
            if let Err(e) = store.complete_audit(*key, record).await {
                let entry = match &record.event {
                    AuditEvent::Command { outbox_id, .. } => *outbox_id,
                    _ => None,
                };
                tracing::warn!(error = %e, entry, "cannot complete a command's audit record: it stays `accepted`; `flowthrough outbox show <entry>` says how the command ended");
            }
        }
    });
    if wait && tokio::time::timeout(AUDIT_WAIT, writing).await.is_err() {
        tracing::warn!(
            waited_ms = AUDIT_WAIT.as_millis() as u64,
            "the store is slow to take audit records: the AS is answered first and the records are written when the store answers (check the database with `flowthrough doctor`)"
        );
    }
}

fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// What a command leaves in the store: what the adapter remembers about the user and customer,
/// and the Webex call to queue for this plan, if any.
fn what_to_keep(
    request: &Request,
    template: &str,
    last_profile: Option<&oci::UserProfile>,
    plan: &Plan,
) -> Result<(Remembered, Option<Call>), crate::store::StoreError> {
    let mut remembered = Remembered::default();
    match &request.command {
        Command::UserAdd(profile) => {
            remembered.profile = Some(profile.clone());
            remembered.template = Some((profile.user_id.clone(), template.to_owned()));
        }
        Command::UserModify(changes) => {
            remembered.profile =
                last_profile.map(|profile| mapping::apply_changes(profile, changes));
        }
        _ => {}
    }
    let call = match plan {
        Plan::Provision { body, .. } => Some(Call::provision(body)?),
        Plan::Update { body, .. } if !body.is_empty() => Some(Call::update(body)?),
        Plan::Remove { .. } => Some(Call::Remove),
        Plan::RecordCustomer(customer) => {
            if let Some(warning) = &customer.mode_mismatch {
                tracing::warn!(service_provider_id = %customer.service_provider_id, "{warning}");
            }
            remembered.customer = Some(Customer {
                service_provider_id: customer.service_provider_id.clone(),
                group_id: customer.group_id.clone(),
                name: customer.name.clone(),
                enterprise: customer.enterprise,
                template: template.to_owned(),
            });
            None
        }
        Plan::NoOp { reason } => {
            tracing::info!(command = %request.name, "no Webex call: {reason}");
            None
        }
        Plan::Update { .. } | Plan::Reject { .. } => None,
    };
    Ok((remembered, call))
}

/// The metric label of a command: its kind, not its name, so release suffixes and unknown names
/// cannot grow the label set.
fn command_kind(command: &Command) -> &'static str {
    match command {
        Command::UserAdd(_) => "UserAddRequest",
        Command::UserModify(_) => "UserModifyRequest",
        Command::UserDelete { .. } => "UserDeleteRequest",
        Command::ServiceAssign { .. } => "UserServiceAssignListRequest",
        Command::ServiceUnassign { .. } => "UserServiceUnassignListRequest",
        Command::IntegratedImpModify { .. } => "UserIntegratedIMPModifyRequest",
        Command::GroupAdd { .. } => "GroupAddRequest",
        Command::ServiceProviderAdd { .. } => "ServiceProviderAddRequest",
        Command::GroupDelete { .. } => "GroupDeleteRequest",
        Command::ServiceProviderDelete { .. } => "ServiceProviderDeleteRequest",
        Command::Unsupported => "unsupported",
        Command::Invalid { .. } => "invalid",
    }
}

fn outcome_label(response: &ResponseCommand) -> String {
    match response {
        ResponseCommand::Success { .. } => "success".to_owned(),
        ResponseCommand::Error(e) => {
            format!("{}_{}", e.severity.as_str().to_ascii_lowercase(), e.code)
        }
    }
}

/// Keep a document (or a command) flowthrough could not use, redacted, for the operator.
async fn keep_document(state: &AppState, client: &str, reason: &str, body: &[u8]) {
    let record = AuditRecord {
        at_ms: now_ms(),
        client: client.to_owned(),
        event: AuditEvent::Document {
            reason: reason.to_owned(),
            excerpt: oci::redacted_excerpt(body, EXCERPT_BYTES),
        },
    };
    if let Err(e) = state.store.append_audit(&record).await {
        tracing::warn!(error = %e, "cannot keep the unreadable document in the audit");
    }
}

/// Shared settings of the provisioning handler, from `[server]` and `[store]`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_body_bytes: usize,
    pub ack_deadline: Duration,
    pub max_connection_age: Duration,
    /// The store is shared with other nodes (PostgreSQL): another node may deliver a command
    /// this one accepted, so a request waiting for its outcome looks at the store too.
    pub shared_store: bool,
}

impl Settings {
    pub fn from_config(
        server: &crate::config::ServerConfig,
        store: &crate::config::StoreConfig,
    ) -> Settings {
        Settings {
            max_body_bytes: server.max_body_bytes,
            ack_deadline: Duration::from_millis(server.ack_deadline_ms),
            max_connection_age: Duration::from_secs(server.max_connection_age_s),
            shared_store: store.backend == crate::config::StoreBackend::Postgres,
        }
    }
}
