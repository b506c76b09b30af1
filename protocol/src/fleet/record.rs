//! A node's signed metrics record: what it measured of each model version it served.

use crate::error::ProtocolError;
use crate::identity::NodeId;
use crate::signed::{Signed, SignedKind};
use crate::sketch::Sketch;
use crate::trust::{verify_certificate, Enrollment, EnrollmentCertificate, TrustStore};
use serde::{Deserialize, Serialize};

pub const MAX_VERSIONS_PER_RECORD: usize = 64;
/// Most requests one node may report for one version: 1,000 a second for 30 years stays
/// below it. A record claiming more is refused, not added up: counts near `u64::MAX`
/// would saturate every sum they enter and meet any `min_samples` on their own.
pub const MAX_REPORTED_REQUESTS: u64 = 1 << 40;
/// Most tokens (prompt or completion) one node may report for one version.
pub const MAX_REPORTED_TOKENS: u64 = 1 << 50;
/// Most newer versions one report may say its node holds staged.
pub const MAX_STAGED_REPORTED: usize = 8;

/// What one node measured of one model version, since it started serving it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VersionReport {
    pub model: String,
    pub version: u64,
    /// Serving it now.
    pub active: bool,
    /// Unix seconds when this node activated it (if it did).
    pub active_since: Option<u64>,
    pub requests: u64,
    pub errors: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub latency: Sketch,
    pub ttft: Sketch,
    pub tokens_per_sec: Sketch,
    /// Times this node failed to load the version (a header that passes, a load that
    /// does not). Reported while the node does not serve it: a failing signal for the
    /// gates even though no request was ever measured.
    pub activation_failures: u32,
    /// This node's results of the manifest's evaluation suite on the version (counts
    /// only), once it ran it.
    #[serde(default)]
    pub eval: Option<crate::eval::EvalCounts>,
    /// Scores of this node's shadow comparisons of the version's answers with the
    /// previous version's (`crate::shadow`), once it compared any: a sketch of numbers in
    /// [0, 1], never a prompt or an answer.
    #[serde(default)]
    pub agreement: Option<Sketch>,
    /// Newer versions of the model that this node holds ready to serve while it serves
    /// this one, ascending: a rollout's progress counts the nodes staged per wave from
    /// these (`FleetView::holders`). Empty unless `active`.
    #[serde(default)]
    pub staged_newer: Vec<u64>,
}

impl VersionReport {
    /// What a node measured of one version, as it reports it.
    pub fn from_metrics(model: &str, version: u64, m: &crate::metrics::VersionMetrics) -> Self {
        VersionReport {
            model: model.to_string(),
            version,
            active: false,
            active_since: None,
            requests: m.requests,
            errors: m.errors,
            prompt_tokens: m.prompt_tokens,
            completion_tokens: m.completion_tokens,
            latency: m.latency.clone(),
            ttft: m.ttft.clone(),
            tokens_per_sec: m.tokens_per_sec.clone(),
            activation_failures: 0,
            eval: None,
            agreement: (m.agreement.count() > 0).then(|| m.agreement.clone()),
            staged_newer: vec![],
        }
    }

    /// Adds another report of the same version: counters summed, sketches merged.
    pub fn add(&mut self, other: &VersionReport) {
        self.add_counters(other);
        self.merge_sketches(&other.latency, &other.ttft, &other.tokens_per_sec, other.agreement.as_ref());
    }

    /// Merges another report's sketches into this one's.
    pub fn merge_sketches(
        &mut self,
        latency: &Sketch,
        ttft: &Sketch,
        tokens_per_sec: &Sketch,
        agreement: Option<&Sketch>,
    ) {
        self.latency.merge(latency);
        self.ttft.merge(ttft);
        self.tokens_per_sec.merge(tokens_per_sec);
        if let Some(theirs) = agreement {
            self.agreement.get_or_insert_with(Sketch::default).merge(theirs);
        }
    }

    /// Adds another report's counters only (the sketches stay as they are).
    pub fn add_counters(&mut self, other: &VersionReport) {
        self.active |= other.active;
        // Remote numbers: saturate rather than overflow.
        self.requests = self.requests.saturating_add(other.requests);
        self.errors = self.errors.saturating_add(other.errors);
        self.prompt_tokens = self.prompt_tokens.saturating_add(other.prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(other.completion_tokens);
        self.activation_failures = self.activation_failures.saturating_add(other.activation_failures);
        if let Some(theirs) = other.eval {
            let mine = self.eval.get_or_insert_with(Default::default);
            mine.cases = mine.cases.saturating_add(theirs.cases);
            mine.passed = mine.passed.saturating_add(theirs.passed);
            mine.checks = mine.checks.saturating_add(theirs.checks);
            mine.checks_passed = mine.checks_passed.saturating_add(theirs.checks_passed);
            if let Some(p) = theirs.previous_passed {
                mine.previous_passed = Some(mine.previous_passed.unwrap_or(0).saturating_add(p));
            }
        }
    }
}

/// What a node measured, signed by it. It counts only with the operator's enrollment of
/// `node` (a `MetricsMessage` carries it beside the record when receivers may not know
/// it yet), so one enrolled node cannot make up node ids and fill a version's metrics
/// panel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsRecord {
    pub node: NodeId,
    /// Grows with every record of this node: an older one never replaces a newer one.
    pub seq: u64,
    /// Unix seconds, by the node's clock.
    pub issued_at: u64,
    pub versions: Vec<VersionReport>,
}

impl SignedKind for MetricsRecord {
    const DOMAIN: &'static [u8] = b"slmesh/metrics";
    const WHAT: &'static str = "metrics record";
    /// Sent by panel members again and again: small counters and short strings, which
    /// fixed-width encoding spent 8 bytes each on.
    const BODY: crate::wire::Encoding = crate::wire::Encoding::Compact;
}

pub type SignedMetrics = Signed<MetricsRecord>;

/// A metrics record as gossiped and synced. The enrollment certificate (about 40% of a
/// record's bytes) goes beside the record, outside its signature, only when receivers
/// may not know the node yet: with a node's first record, when its reports change
/// versions, every 30 metrics intervals, and in a sync reply to a
/// node that holds no record of it. A receiver keeps the certificate of every record
/// it holds and checks a record without one against that; a record without one from a
/// node it holds nothing of is ignored (anti-entropy brings it with its certificate).
/// Being outside the signature, a certificate can be stripped or swapped by a
/// forwarder, which gains nothing: only a valid one for the record's own node counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsMessage {
    pub record: SignedMetrics,
    pub certificate: Option<EnrollmentCertificate>,
}

impl MetricsMessage {
    pub fn to_bytes(&self) -> Result<Vec<u8>, ProtocolError> {
        crate::wire::encode(self)
    }

    /// Decodes untrusted bytes; nothing is verified yet (`verify_metrics` does).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ProtocolError> {
        let message: Self = crate::wire::decode(bytes, "metrics message")?;
        message.record.check_version()?;
        if let Some(c) = &message.certificate {
            c.check_version()?;
        }
        Ok(message)
    }
}

/// Checks a metrics record: self-signed by the node it names, within limits, consistent,
/// and from a node the operator enrolled in `fleet` (by `certificate`, which must be
/// valid at `now`, Unix seconds).
pub fn verify_metrics(
    signed: &SignedMetrics,
    certificate: &EnrollmentCertificate,
    trust: &TrustStore,
    fleet: &str,
    now: u64,
) -> Result<MetricsRecord, ProtocolError> {
    let record = verify_metrics_body(signed)?;
    let enrollment = verify_certificate(certificate, trust, &record.node, now)
        .map_err(|e| ProtocolError::invalid("metrics record", format!("not from an enrolled node: {e}")))?;
    crate::trust::same_fleet("the metrics record's node", &enrollment.fleet, fleet)?;
    Ok(record)
}

/// `verify_metrics` under an enrollment checked already (the certificate a receiver
/// holds for the node, verified once for the record).
pub fn verify_metrics_enrolled(
    signed: &SignedMetrics,
    enrollment: &Enrollment,
    fleet: &str,
) -> Result<MetricsRecord, ProtocolError> {
    let record = verify_metrics_body(signed)?;
    if enrollment.node != record.node {
        return Err(ProtocolError::invalid(
            "metrics record",
            "not from an enrolled node: the enrollment is another node's",
        ));
    }
    crate::trust::same_fleet("the metrics record's node", &enrollment.fleet, fleet)?;
    Ok(record)
}

/// The checks that need no trust: signature, limits, consistency.
fn verify_metrics_body(signed: &SignedMetrics) -> Result<MetricsRecord, ProtocolError> {
    signed.check_version()?;
    let record = signed.verify_self_signed()?;
    let bad = |r: String| Err(ProtocolError::invalid("metrics record", r));
    if record.node != signed.signer {
        return bad("signed by another node than the one it names".into());
    }
    if record.versions.len() > MAX_VERSIONS_PER_RECORD {
        return bad(format!("{} versions, at most {MAX_VERSIONS_PER_RECORD}", record.versions.len()));
    }
    for v in &record.versions {
        if v.errors > v.requests {
            return bad(format!("{}@{}: more errors than requests", v.model, v.version));
        }
        if v.staged_newer.len() > MAX_STAGED_REPORTED
            || !v.staged_newer.windows(2).all(|w| w[0] < w[1])
            || v.staged_newer.first().is_some_and(|s| *s <= v.version)
            || (!v.active && !v.staged_newer.is_empty())
        {
            return bad(format!(
                "{}@{}: staged versions must be at most {MAX_STAGED_REPORTED} newer ones, ascending, of a served version",
                v.model, v.version
            ));
        }
        if v.requests > MAX_REPORTED_REQUESTS || v.prompt_tokens.max(v.completion_tokens) > MAX_REPORTED_TOKENS {
            return bad(format!("{}@{}: counts beyond what one node can have served", v.model, v.version));
        }
        for s in [&v.latency, &v.ttft, &v.tokens_per_sec].into_iter().chain(&v.agreement) {
            s.validate()?;
            if s.count() > MAX_REPORTED_REQUESTS {
                return bad(format!(
                    "{}@{}: a sketch of more values than one node can have measured",
                    v.model, v.version
                ));
            }
        }
    }
    Ok(record)
}
