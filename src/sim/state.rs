//! The simulator's in-memory world: subscribers, issued tokens, fault settings and counters, with
//! the Webex validation rules. Plain data behind one mutex; the HTTP layer only translates.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// How a 429 carries `Retry-After`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryAfterMode {
    #[default]
    Numeric,
    HttpDate,
    /// `rand(30),add(30)`, as seen in the wild.
    Malformed,
    Absent,
}

/// Fault injection and behaviour knobs; set at start, changed at run time with
/// `POST /_sim/control` (any subset of the keys).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Control {
    /// Requests per second on the subscriber API before 429; 0 = no limit.
    pub rate_limit_per_s: u32,
    pub retry_after: RetryAfterMode,
    pub retry_after_s: u64,
    /// Share of subscriber-API requests answered 423 (0.0–1.0).
    pub locked_ratio: f64,
    /// Share answered 503.
    pub server_error_ratio: f64,
    /// Added latency after the request is processed (so a client timeout leaves the work done).
    pub latency_ms: u64,
    /// Apply `latency_ms` only to the next N requests; absent = to all.
    pub latency_count: Option<u32>,
    /// Share of requests whose connection is dropped without an answer.
    pub drop_ratio: f64,
    /// List pages' `next` links leave out the `userId` filter.
    pub drop_filter_on_next: bool,
    /// Page size when the client does not send `max`.
    pub page_size: usize,
    pub token_lifetime_s: u64,
    pub refresh_token_lifetime_s: u64,
    /// Each refresh returns a new refresh token and invalidates the old one.
    pub rotate_refresh_token: bool,
    /// Every refresh is answered `invalid_grant`.
    pub refresh_token_revoked: bool,
    /// How long a new or updated subscriber stays `provisioning`/`updating`.
    pub provisioning_delay_ms: u64,
    /// userIds containing one of these end in `error` with `errors[]`.
    pub error_user_ids: Vec<String>,
    /// Added latency of every list page (`GET /broadworks/subscribers`), on top of
    /// `latency_ms`: the floor of a paged read is the pages it needs times this.
    pub list_latency_ms: u64,
    /// Keep a record of every subscriber-API call (see [`CallRecord`]). Off by default: a
    /// benchmark's millions of calls would grow it without bound.
    pub record_calls: bool,
}

impl Default for Control {
    fn default() -> Self {
        Control {
            rate_limit_per_s: 0,
            retry_after: RetryAfterMode::Numeric,
            retry_after_s: 1,
            locked_ratio: 0.0,
            server_error_ratio: 0.0,
            latency_ms: 0,
            latency_count: None,
            drop_ratio: 0.0,
            drop_filter_on_next: false,
            page_size: 100,
            token_lifetime_s: 3600,
            refresh_token_lifetime_s: 60 * 24 * 3600,
            rotate_refresh_token: false,
            refresh_token_revoked: false,
            provisioning_delay_ms: 0,
            error_user_ids: Vec::new(),
            list_latency_ms: 0,
            record_calls: false,
        }
    }
}

/// One subscriber-API call as the simulator answered it. Tests with several flowthrough nodes
/// read what reached Webex for each user, in the order it was applied, from these: the final
/// state alone cannot tell a command applied twice, or two applied in the wrong order and
/// then overwritten, from a correct run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CallRecord {
    /// Order of the call's work among all calls (the state's lock decides it).
    pub seq: u64,
    /// When the work was done, Unix milliseconds.
    pub at_ms: u64,
    /// `provision`, `update`, `remove`, `get`, `list` or `validate`.
    pub kind: String,
    /// The userId the call was about: from the body, the addressed subscriber or the list's
    /// filter; `None` when it named none (an unknown subscriber id, an unfiltered list).
    pub user_id: Option<String>,
    /// The HTTP status answered; 0 for a dropped connection.
    pub status: u16,
    /// The request's JSON body (`null` when it had none).
    pub body: Value,
}

impl CallRecord {
    /// Whether the call changed Webex's state: a provision, update or remove answered 2xx.
    pub fn applied(&self) -> bool {
        matches!(self.kind.as_str(), "provision" | "update" | "remove")
            && (200..300).contains(&self.status)
    }
}

#[derive(Debug, Clone)]
struct Sub {
    id: String,
    fields: BTreeMap<String, String>,
    settle_at: Instant,
    /// How long after `changed` the status settles (`settle_at` on the wall clock).
    settles_after: Duration,
    updated: bool,
    fails: bool,
    created: SystemTime,
    /// When the status last changed, or when the call that starts a change was accepted.
    changed: SystemTime,
    /// A status that never moves (seeded: `error` with its errors, a stuck `provisioning`,
    /// a `pending_*` state).
    fixed: Option<Fixed>,
}

#[derive(Debug, Clone)]
struct Fixed {
    status: String,
    errors: Vec<(u32, String)>,
}

/// The statuses a seeded subscriber may be given (SPEC §4).
const STATUSES: [&str; 7] = [
    "pending_email_input",
    "pending_email_validation",
    "pending_user_migration",
    "provisioning",
    "provisioned",
    "updating",
    "error",
];

fn iso8601(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// What a handler answers.
pub enum Reply {
    Json {
        status: u16,
        headers: Vec<(String, String)>,
        body: Value,
    },
    Empty(u16),
    Drop,
}

impl Reply {
    /// The HTTP status, 0 for a dropped connection.
    pub fn status(&self) -> u16 {
        match self {
            Reply::Json { status, .. } | Reply::Empty(status) => *status,
            Reply::Drop => 0,
        }
    }
}

fn error(status: u16, message: &str, errors: &[(u32, &str)]) -> Reply {
    Reply::Json {
        status,
        headers: Vec::new(),
        body: json!({
            "message": message,
            "errors": errors.iter().map(|(c, d)| json!({"errorCode": c, "description": d})).collect::<Vec<_>>(),
            "trackingId": format!("SIMULATOR_{}", uuid::Uuid::new_v4()),
        }),
    }
}

fn ok(body: Value) -> Reply {
    Reply::Json {
        status: 200,
        headers: Vec::new(),
        body,
    }
}

const PACKAGES: [&str; 4] = ["softphone", "basic", "standard", "premium"];
const REQUIRED: [&str; 6] = [
    "provisioningId",
    "userId",
    "spEnterpriseId",
    "firstName",
    "lastName",
    "package",
];
const OPTIONAL_POST: [&str; 6] = [
    "primaryPhoneNumber",
    "mobilePhoneNumber",
    "extension",
    "email",
    "language",
    "timezone",
];
const PUT_FIELDS: [&str; 8] = [
    "userId",
    "firstName",
    "lastName",
    "primaryPhoneNumber",
    "mobilePhoneNumber",
    "extension",
    "timezone",
    "package",
];

pub struct SimState {
    pub control: Control,
    pub client_id: String,
    pub client_secret: String,
    refresh_tokens: HashMap<String, Instant>,
    access_tokens: HashMap<String, Instant>,
    subs: Vec<Sub>,
    /// Position of each subscriber id in `subs`, and the ids of the subscribers carrying each
    /// userId: lookups stay O(1) when benchmarks create hundreds of thousands of subscribers. (A
    /// lookup by userId once scanned them all under the state's lock: 20–60 ms each after a
    /// crash run's restarts, which held up every other call.)
    positions: HashMap<String, usize>,
    user_ids: HashMap<String, Vec<String>>,
    counters: BTreeMap<String, u64>,
    window: (Instant, u32),
    calls: Vec<CallRecord>,
}

impl SimState {
    pub fn new(
        control: Control,
        client_id: String,
        client_secret: String,
        refresh: String,
    ) -> Self {
        let lifetime = Duration::from_secs(control.refresh_token_lifetime_s);
        let mut refresh_tokens = HashMap::new();
        refresh_tokens.insert(refresh, Instant::now() + lifetime);
        SimState {
            control,
            client_id,
            client_secret,
            refresh_tokens,
            access_tokens: HashMap::new(),
            subs: Vec::new(),
            positions: HashMap::new(),
            user_ids: HashMap::new(),
            counters: BTreeMap::new(),
            window: (Instant::now(), 0),
            calls: Vec::new(),
        }
    }

    /// The userId carried by the subscriber with this id, if there is one.
    pub fn user_of(&self, id: &str) -> Option<String> {
        self.find(id).and_then(|s| s.fields.get("userId").cloned())
    }

    /// Record a call when `record_calls` is on.
    pub fn record_call(&mut self, kind: &str, user_id: Option<String>, status: u16, body: Value) {
        if !self.control.record_calls {
            return;
        }
        let at_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.calls.push(CallRecord {
            seq: self.calls.len() as u64,
            at_ms,
            kind: kind.to_owned(),
            user_id,
            status,
            body,
        });
    }

    /// Every call recorded so far, in the order their work was done.
    pub fn calls(&self) -> &[CallRecord] {
        &self.calls
    }

    /// A counter's value, 0 when never counted.
    pub fn counter(&self, what: &str) -> u64 {
        self.counters.get(what).copied().unwrap_or(0)
    }

    pub fn count(&mut self, what: &str) {
        *self.counters.entry(what.to_owned()).or_default() += 1;
    }

    /// Merge a partial control document over the current settings.
    pub fn apply_control(&mut self, patch: Value) -> Result<(), String> {
        let mut current = serde_json::to_value(&self.control).map_err(|e| e.to_string())?;
        let (Value::Object(cur), Value::Object(p)) = (&mut current, patch) else {
            return Err("the control body must be a JSON object".to_owned());
        };
        cur.extend(p);
        self.control = serde_json::from_value(current).map_err(|e| e.to_string())?;
        Ok(())
    }

    pub fn expire_access_tokens(&mut self) {
        self.access_tokens.clear();
    }

    /// Install an extra valid refresh token (tests use it to hand out a second credential).
    pub fn add_refresh_token(&mut self, token: String) {
        let at = Instant::now() + Duration::from_secs(self.control.refresh_token_lifetime_s);
        self.refresh_tokens.insert(token, at);
    }

    /// The latency to add to this request, consuming one of `latency_count`.
    pub fn take_latency(&mut self) -> Option<Duration> {
        if self.control.latency_ms == 0 {
            return None;
        }
        match &mut self.control.latency_count {
            Some(0) => return None,
            Some(n) => *n -= 1,
            None => {}
        }
        Some(Duration::from_millis(self.control.latency_ms))
    }

    /// Faults that answer before any work: drop, 429, 423, 503.
    pub fn fault(&mut self) -> Option<Reply> {
        let mut rng = rand::rng();
        if rng.random_bool(self.control.drop_ratio.clamp(0.0, 1.0)) {
            self.count("dropped");
            return Some(Reply::Drop);
        }
        if self.control.rate_limit_per_s > 0 {
            let now = Instant::now();
            if now.duration_since(self.window.0) >= Duration::from_secs(1) {
                self.window = (now, 0);
            }
            self.window.1 += 1;
            if self.window.1 > self.control.rate_limit_per_s {
                self.count("sent_429");
                let mut reply = error(429, "Too many requests", &[]);
                if let Reply::Json { headers, .. } = &mut reply
                    && let Some(v) = self.retry_after_value()
                {
                    headers.push(("Retry-After".to_owned(), v));
                }
                return Some(reply);
            }
        }
        if rng.random_bool(self.control.locked_ratio.clamp(0.0, 1.0)) {
            self.count("sent_423");
            return Some(error(
                423,
                "The subscriber is locked by another operation",
                &[],
            ));
        }
        if rng.random_bool(self.control.server_error_ratio.clamp(0.0, 1.0)) {
            self.count("sent_5xx");
            return Some(error(503, "Service unavailable (simulated)", &[]));
        }
        None
    }

    fn retry_after_value(&self) -> Option<String> {
        let secs = self.control.retry_after_s;
        match self.control.retry_after {
            RetryAfterMode::Numeric => Some(secs.to_string()),
            RetryAfterMode::HttpDate => Some(httpdate::fmt_http_date(
                SystemTime::now() + Duration::from_secs(secs),
            )),
            RetryAfterMode::Malformed => Some("rand(30),add(30)".to_owned()),
            RetryAfterMode::Absent => None,
        }
    }

    /// The bearer token must be one this simulator issued and not expired.
    pub fn check_auth(&mut self, authorization: Option<&str>) -> Result<(), Reply> {
        let token = authorization.and_then(|h| h.strip_prefix("Bearer "));
        let valid = token
            .and_then(|t| self.access_tokens.get(t))
            .is_some_and(|exp| *exp > Instant::now());
        if valid {
            Ok(())
        } else {
            self.count("sent_401");
            Err(error(401, "The request requires a valid access token", &[]))
        }
    }

    /// `POST /access_token` with the refresh grant; answers like an OAuth server.
    pub fn refresh(&mut self, form: &HashMap<String, String>) -> Reply {
        self.count("refreshes");
        let get = |k: &str| form.get(k).map(String::as_str).unwrap_or_default();
        let oauth = |status: u16, code: &str, desc: &str| Reply::Json {
            status,
            headers: Vec::new(),
            body: json!({"error": code, "error_description": desc}),
        };
        if get("grant_type") != "refresh_token" {
            return oauth(
                400,
                "unsupported_grant_type",
                "only refresh_token is supported",
            );
        }
        if get("client_id") != self.client_id || get("client_secret") != self.client_secret {
            self.count("refresh_rejected");
            return oauth(401, "invalid_client", "unknown client or wrong secret");
        }
        let presented = get("refresh_token").to_owned();
        let now = Instant::now();
        let valid = self
            .refresh_tokens
            .get(&presented)
            .is_some_and(|exp| *exp > now);
        if self.control.refresh_token_revoked || !valid {
            self.count("refresh_rejected");
            return oauth(
                400,
                "invalid_grant",
                "the refresh token is invalid or revoked",
            );
        }
        let access = format!("sim-access-{}", uuid::Uuid::new_v4().simple());
        self.access_tokens.insert(
            access.clone(),
            now + Duration::from_secs(self.control.token_lifetime_s),
        );
        let refresh = if self.control.rotate_refresh_token {
            self.refresh_tokens.remove(&presented);
            let new = format!("sim-refresh-{}", uuid::Uuid::new_v4().simple());
            let at = now + Duration::from_secs(self.control.refresh_token_lifetime_s);
            self.refresh_tokens.insert(new.clone(), at);
            new
        } else {
            presented.clone()
        };
        let refresh_left = self
            .refresh_tokens
            .get(&refresh)
            .map(|exp| exp.saturating_duration_since(now).as_secs())
            .unwrap_or_default();
        ok(json!({
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": self.control.token_lifetime_s,
            "refresh_token": refresh,
            "refresh_token_expires_in": refresh_left,
        }))
    }

    /// The status now, and when it last changed.
    fn status_of(s: &Sub) -> (&str, SystemTime) {
        if let Some(fixed) = &s.fixed {
            return (&fixed.status, s.changed);
        }
        let now = Instant::now();
        if now < s.settle_at {
            let status = if s.updated {
                "updating"
            } else {
                "provisioning"
            };
            return (status, s.changed);
        }
        let settled = s.changed + s.settles_after;
        (if s.fails { "error" } else { "provisioned" }, settled)
    }

    fn sub_json(&self, s: &Sub) -> Value {
        let (status, changed) = Self::status_of(s);
        let mut v = json!({"id": s.id, "personId": format!("person-{}", s.id), "status": status,
            "created": iso8601(s.created), "lastStatusChange": iso8601(changed)});
        for (k, val) in &s.fields {
            v[k] = json!(val);
        }
        v["errors"] = match &s.fixed {
            Some(fixed) if status == "error" => fixed
                .errors
                .iter()
                .map(|(code, description)| json!({"errorCode": code, "description": description}))
                .collect(),
            _ if status == "error" => {
                json!([{"errorCode": 4003, "description": "Simulated provisioning failure"}])
            }
            _ => json!([]),
        };
        v
    }

    fn validate(
        body: &Value,
        allowed: &[&str],
        required: &[&str],
    ) -> Result<BTreeMap<String, String>, Reply> {
        let Some(obj) = body.as_object() else {
            return Err(error(400, "The body must be a JSON object", &[]));
        };
        let mut fields = BTreeMap::new();
        for (k, v) in obj {
            if !allowed.contains(&k.as_str()) {
                return Err(error(
                    400,
                    &format!("{k} cannot be set here"),
                    &[(4001, "Invalid field")],
                ));
            }
            let Some(s) = v.as_str() else {
                return Err(error(
                    400,
                    &format!("{k} must be a string"),
                    &[(4001, "Invalid field")],
                ));
            };
            fields.insert(k.clone(), s.to_owned());
        }
        for r in required {
            if fields.get(*r).is_none_or(|v| v.is_empty()) {
                return Err(error(
                    400,
                    &format!("{r} is required"),
                    &[(4002, "Missing field")],
                ));
            }
        }
        if let Some(p) = fields.get("package")
            && !PACKAGES.contains(&p.as_str())
        {
            return Err(error(
                400,
                &format!("package {p:?} is not one of {PACKAGES:?}"),
                &[(4001, "Invalid package")],
            ));
        }
        Ok(fields)
    }

    fn post_fields(body: &Value) -> Result<BTreeMap<String, String>, Reply> {
        let allowed: Vec<&str> = REQUIRED
            .iter()
            .chain(OPTIONAL_POST.iter())
            .copied()
            .collect();
        Self::validate(body, &allowed, &REQUIRED)
    }

    fn duplicate(&self, user_id: &str, except: Option<&str>) -> bool {
        let carriers = self.user_ids.get(user_id).map_or(0, Vec::len);
        let except_carries = except
            .and_then(|id| self.find(id))
            .is_some_and(|s| s.fields.get("userId").map(String::as_str) == Some(user_id));
        carriers > usize::from(except_carries)
    }

    fn find(&self, id: &str) -> Option<&Sub> {
        self.positions.get(id).and_then(|&i| self.subs.get(i))
    }

    fn carry(&mut self, user_id: Option<&String>, sub_id: &str) {
        if let Some(u) = user_id {
            self.user_ids
                .entry(u.clone())
                .or_default()
                .push(sub_id.to_owned());
        }
    }

    fn uncarry(&mut self, user_id: Option<&String>, sub_id: &str) {
        if let Some(u) = user_id
            && let Some(ids) = self.user_ids.get_mut(u)
        {
            ids.retain(|id| id != sub_id);
            if ids.is_empty() {
                self.user_ids.remove(u);
            }
        }
    }

    pub fn provision(&mut self, body: &Value) -> Reply {
        let fields = match Self::post_fields(body) {
            Ok(f) => f,
            Err(r) => return r,
        };
        let user_id = fields.get("userId").cloned().unwrap_or_default();
        if self.duplicate(&user_id, None) {
            return error(
                409,
                "BroadWorks UserID already associated with an existing user",
                &[(
                    10022,
                    "BroadWorks UserID already associated with an existing user",
                )],
            );
        }
        let fails = self
            .control
            .error_user_ids
            .iter()
            .any(|p| user_id.contains(p.as_str()));
        let sub = Sub {
            id: format!("sim-sub-{}", uuid::Uuid::new_v4().simple()),
            fields,
            settle_at: Instant::now() + Duration::from_millis(self.control.provisioning_delay_ms),
            settles_after: Duration::from_millis(self.control.provisioning_delay_ms),
            updated: false,
            fails,
            created: SystemTime::now(),
            changed: SystemTime::now(),
            fixed: None,
        };
        let out = self.sub_json(&sub);
        self.insert(sub);
        ok(out)
    }

    fn insert(&mut self, sub: Sub) {
        self.carry(sub.fields.get("userId"), &sub.id);
        self.positions.insert(sub.id.clone(), self.subs.len());
        self.subs.push(sub);
    }

    /// Put subscribers in place without the API (tests and benchmarks start from a population):
    /// each item is a provisioning body, plus optionally `status` (one of the API's statuses,
    /// kept for good: `error` with `errors`, a stuck `provisioning`, a `pending_*` state) and
    /// `statusAgeS` (how long ago the status changed). The API's validation applies, a
    /// duplicate userId included. Returns how many were added.
    pub fn seed(&mut self, items: &[Value]) -> Result<usize, String> {
        for (n, item) in items.iter().enumerate() {
            let at = |e: String| format!("subscriber {n}: {e}");
            let Some(obj) = item.as_object() else {
                return Err(at("not a JSON object".to_owned()));
            };
            let mut body = obj.clone();
            let status = body.remove("status");
            let age = body
                .remove("statusAgeS")
                .and_then(|a| a.as_u64())
                .unwrap_or(0);
            let errors = body.remove("errors");
            let fields = Self::post_fields(&Value::Object(body)).map_err(|reply| {
                at(match reply {
                    Reply::Json { body, .. } => body["message"].to_string(),
                    _ => "refused".to_owned(),
                })
            })?;
            let user_id = fields.get("userId").cloned().unwrap_or_default();
            if self.duplicate(&user_id, None) {
                return Err(at(format!("userId {user_id} exists already")));
            }
            let fixed = match status.as_ref().map(|s| s.as_str()) {
                None | Some(Some("provisioned")) => None,
                Some(Some(status)) if STATUSES.contains(&status) => Some(Fixed {
                    status: status.to_owned(),
                    errors: errors
                        .and_then(|e| e.as_array().cloned())
                        .unwrap_or_default()
                        .iter()
                        .map(|e| {
                            let code = e["errorCode"].as_u64().unwrap_or(0) as u32;
                            (code, e["description"].as_str().unwrap_or("").to_owned())
                        })
                        .collect(),
                }),
                Some(other) => {
                    return Err(at(format!("status {other:?} is not one of {STATUSES:?}")));
                }
            };
            let changed = SystemTime::now() - Duration::from_secs(age);
            self.insert(Sub {
                id: format!("sim-sub-{}", uuid::Uuid::new_v4().simple()),
                fields,
                settle_at: Instant::now(),
                settles_after: Duration::ZERO,
                updated: false,
                fails: false,
                created: changed,
                changed,
                fixed,
            });
        }
        Ok(items.len())
    }

    pub fn precheck(&mut self, body: &Value) -> Reply {
        let fields = match Self::post_fields(body) {
            Ok(f) => f,
            Err(r) => return r,
        };
        if self.duplicate(
            fields.get("userId").map(String::as_str).unwrap_or_default(),
            None,
        ) {
            return error(
                409,
                "BroadWorks UserID already associated with an existing user",
                &[(
                    10022,
                    "BroadWorks UserID already associated with an existing user",
                )],
            );
        }
        ok(json!({"message": "precheck passed (simulator)"}))
    }

    pub fn update(&mut self, id: &str, body: &Value) -> Reply {
        let fields = match Self::validate(body, &PUT_FIELDS, &[]) {
            Ok(f) => f,
            Err(r) => return r,
        };
        if let Some(u) = fields.get("userId")
            && self.duplicate(u, Some(id))
        {
            return error(
                409,
                "BroadWorks UserID already associated with an existing user",
                &[(
                    10022,
                    "BroadWorks UserID already associated with an existing user",
                )],
            );
        }
        let delay = Duration::from_millis(self.control.provisioning_delay_ms);
        let Some(&at) = self.positions.get(id) else {
            return error(404, "Subscriber not found", &[]);
        };
        if let Some(u) = fields.get("userId") {
            let old = self
                .subs
                .get(at)
                .and_then(|s| s.fields.get("userId"))
                .cloned();
            self.uncarry(old.as_ref(), id);
            self.carry(Some(u), id);
        }
        let Some(sub) = self.subs.get_mut(at) else {
            return error(404, "Subscriber not found", &[]);
        };
        for (k, v) in fields {
            if v.is_empty() && k.ends_with("PhoneNumber") {
                sub.fields.remove(&k);
            } else {
                sub.fields.insert(k, v);
            }
        }
        sub.settle_at = Instant::now() + delay;
        sub.settles_after = delay;
        sub.updated = true;
        sub.changed = SystemTime::now();
        // A successful update is a new provisioning attempt: a seeded status does not survive it.
        sub.fixed = None;
        let sub = sub.clone();
        ok(self.sub_json(&sub))
    }

    pub fn remove(&mut self, id: &str) -> Reply {
        let Some(at) = self.positions.remove(id) else {
            return error(404, "Subscriber not found", &[]);
        };
        let sub = self.subs.remove(at);
        self.uncarry(sub.fields.get("userId"), &sub.id);
        for (i, s) in self.subs.iter().enumerate().skip(at) {
            self.positions.insert(s.id.clone(), i);
        }
        Reply::Empty(204)
    }

    pub fn get(&self, id: &str) -> Reply {
        match self.find(id) {
            Some(s) => ok(self.sub_json(s)),
            None => error(404, "Subscriber not found", &[]),
        }
    }

    /// One page of the list, filtered by `userId`, `provisioningId`, `spEnterpriseId` and
    /// `status` as Webex does. `base` is the absolute URL of the list endpoint, for `next` links;
    /// with `drop_filter_on_next` those links leave every filter out (seen from Webex).
    pub fn list(&self, query: &HashMap<String, String>, base: &str) -> Reply {
        const FILTERS: [&str; 4] = ["userId", "provisioningId", "spEnterpriseId", "status"];
        let max = query
            .get("max")
            .and_then(|m| m.parse::<usize>().ok())
            .filter(|m| *m > 0)
            .unwrap_or(self.control.page_size.max(1));
        let start = query
            .get("start")
            .and_then(|s| s.parse::<usize>().ok())
            .unwrap_or(0);
        let filters: Vec<(&str, &String)> = FILTERS
            .iter()
            .filter_map(|f| query.get(*f).map(|v| (*f, v)))
            .collect();
        let wanted = |s: &Sub| {
            filters.iter().all(|(key, value)| match *key {
                "status" => Self::status_of(s).0 == value.as_str(),
                key => s.fields.get(key) == Some(*value),
            })
        };
        // By userId from the index, in creation order like the whole list.
        let matching: Vec<&Sub> = match query.get("userId") {
            None => self.subs.iter().filter(|s| wanted(s)).collect(),
            Some(u) => {
                let mut at: Vec<usize> = self
                    .user_ids
                    .get(u)
                    .into_iter()
                    .flatten()
                    .filter_map(|id| self.positions.get(id).copied())
                    .collect();
                at.sort_unstable();
                at.into_iter()
                    .filter_map(|i| self.subs.get(i))
                    .filter(|s| wanted(s))
                    .collect()
            }
        };
        let items: Vec<Value> = matching
            .iter()
            .skip(start)
            .take(max)
            .map(|s| self.sub_json(s))
            .collect();
        let mut headers = Vec::new();
        let dropping = self.control.drop_filter_on_next && !filters.is_empty();
        let more = start + max < matching.len() || (dropping && start + max < self.subs.len());
        if more && let Ok(mut next) = reqwest::Url::parse(base) {
            {
                let mut q = next.query_pairs_mut();
                if !dropping {
                    for (key, value) in &filters {
                        q.append_pair(key, value);
                    }
                }
                q.append_pair("max", &max.to_string());
                q.append_pair("start", &(start + max).to_string());
            }
            headers.push(("Link".to_owned(), format!("<{next}>; rel=\"next\"")));
        }
        Reply::Json {
            status: 200,
            headers,
            body: json!({ "items": items }),
        }
    }

    pub fn snapshot(&self) -> Value {
        let subs: Vec<Value> = self
            .subs
            .iter()
            .map(|s| {
                let v = self.sub_json(s);
                let mut out = json!({"id": s.id, "status": v["status"]});
                for k in [
                    "userId",
                    "firstName",
                    "lastName",
                    "email",
                    "primaryPhoneNumber",
                    "mobilePhoneNumber",
                    "extension",
                    "language",
                    "timezone",
                    "package",
                    "spEnterpriseId",
                    "provisioningId",
                ] {
                    out[k] = s.fields.get(k).map(|v| json!(v)).unwrap_or(Value::Null);
                }
                out
            })
            .collect();
        json!({"subscribers": subs, "counters": self.counters})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(reply: Reply) -> Value {
        match reply {
            Reply::Json { body, .. } => body,
            Reply::Empty(status) => panic!("expected a JSON reply, got an empty {status}"),
            Reply::Drop => panic!("expected a JSON reply, got a dropped connection"),
        }
    }

    fn ids_of(state: &SimState, user_id: &str) -> Vec<String> {
        let query = HashMap::from([("userId".to_owned(), user_id.to_owned())]);
        body(state.list(&query, "https://sim.example/v1/broadworks/subscribers"))["items"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|s| s["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The userId index follows every change: a lookup finds exactly the subscribers that carry
    /// the userId now, as the scan it replaced did.
    #[test]
    fn lookups_by_user_id_follow_provision_update_and_remove() {
        let mut state = SimState::new(Control::default(), "c".into(), "s".into(), "r".into());
        let mut provision = |user: &str| -> String {
            let reply = state.provision(&json!({"provisioningId": "p", "userId": user,
                "spEnterpriseId": "e", "firstName": "A", "lastName": "B", "package": "premium"}));
            body(reply)["id"].as_str().unwrap_or_default().to_owned()
        };
        let a = provision("a@x.example");
        let b = provision("b@x.example");
        let c = provision("c@x.example");
        assert!(!a.is_empty() && !b.is_empty() && !c.is_empty());
        assert_eq!(ids_of(&state, "a@x.example"), std::slice::from_ref(&a));
        assert!(ids_of(&state, "nobody@x.example").is_empty());

        body(state.update(&b, &json!({"userId": "d@x.example"})));
        assert!(ids_of(&state, "b@x.example").is_empty());
        assert_eq!(ids_of(&state, "d@x.example"), std::slice::from_ref(&b));
        assert!(matches!(
            state.update(&c, &json!({"userId": "a@x.example"})),
            Reply::Json { status: 409, .. }
        ));

        assert!(matches!(state.remove(&a), Reply::Empty(204)));
        assert!(ids_of(&state, "a@x.example").is_empty());
        assert_eq!(ids_of(&state, "c@x.example"), std::slice::from_ref(&c));
        assert_eq!(ids_of(&state, "d@x.example"), [b]);
        // A userId freed by the remove can be provisioned again.
        assert!(matches!(
            state.update(&c, &json!({"userId": "a@x.example"})),
            Reply::Json { status: 200, .. }
        ));
        assert_eq!(ids_of(&state, "a@x.example"), [c]);
    }

    fn page(state: &SimState, query: &[(&str, &str)]) -> (Vec<Value>, Option<String>) {
        let query: HashMap<String, String> = query
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        match state.list(&query, "https://sim.example/v1/broadworks/subscribers") {
            Reply::Json { body, headers, .. } => (
                body["items"].as_array().cloned().unwrap_or_default(),
                headers
                    .into_iter()
                    .find(|(k, _)| k == "Link")
                    .map(|(_, v)| v),
            ),
            _ => panic!("the list answers JSON"),
        }
    }

    #[test]
    fn a_seeded_population_is_listed_by_filter_and_page_with_its_statuses() {
        let mut state = SimState::new(Control::default(), "c".into(), "s".into(), "r".into());
        let sub = |i: usize, prov: &str| {
            json!({"provisioningId": prov, "userId": format!("u{i}@x"), "spEnterpriseId": format!("ent{}", i % 2),
                "firstName": "A", "lastName": "B", "package": "basic"})
        };
        let mut items: Vec<Value> = (0..250).map(|i| sub(i, "p1")).collect();
        items[3]["status"] = json!("error");
        items[3]["errors"] = json!([{"errorCode": 10022, "description": "dup"}]);
        items[4]["status"] = json!("provisioning");
        items[4]["statusAgeS"] = json!(7200);
        items.push(sub(999, "p2"));
        assert_eq!(state.seed(&items), Ok(251));
        let duplicate = state.seed(&[sub(0, "p1")]).unwrap_err();
        assert!(duplicate.contains("exists already"), "{duplicate}");
        let bad = state.seed(&[json!({"userId": "x"})]).unwrap_err();
        assert!(bad.contains("is required"), "{bad}");
        assert!(state.seed(&[json!({"status": "bogus"})]).is_err());

        let (first, next) = page(&state, &[("provisioningId", "p1"), ("max", "100")]);
        assert_eq!(first.len(), 100);
        let next = next.unwrap();
        assert!(
            next.contains("provisioningId=p1") && next.contains("start=100"),
            "{next}"
        );
        let (last, none) = page(
            &state,
            &[("provisioningId", "p1"), ("max", "100"), ("start", "200")],
        );
        assert_eq!((last.len(), none), (50, None));
        let (ent, _) = page(&state, &[("spEnterpriseId", "ent1"), ("max", "1000")]);
        assert_eq!(ent.len(), 125 + 1);
        let (errors, _) = page(&state, &[("status", "error")]);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0]["errors"][0]["errorCode"], 10022);
        let (stuck, _) = page(
            &state,
            &[("status", "provisioning"), ("provisioningId", "p1")],
        );
        assert_eq!(stuck[0]["userId"], "u4@x");
        let changed =
            chrono::DateTime::parse_from_rfc3339(stuck[0]["lastStatusChange"].as_str().unwrap())
                .unwrap();
        assert!(
            chrono::Utc::now()
                .signed_duration_since(changed)
                .num_seconds()
                >= 7199
        );
        // An update is a new attempt: the seeded status gives way.
        let id = stuck[0]["id"].as_str().unwrap().to_owned();
        body(state.update(&id, &json!({"lastName": "C"})));
        let (none_left, _) = page(&state, &[("status", "provisioning")]);
        assert!(none_left.is_empty());
        // With drop_filter_on_next the next link carries no filter.
        state.control.drop_filter_on_next = true;
        let (_, next) = page(&state, &[("provisioningId", "p2"), ("max", "1")]);
        assert!(next.is_some_and(|n| !n.contains("provisioningId")));
    }
}
