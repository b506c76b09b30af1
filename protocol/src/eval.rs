//! Evaluation suites: prompts with checks on their answers, carried inside a signed
//! manifest and run by a node on a new version before it serves it (and by an operator on
//! a GGUF before signing it, `slmesh eval`). Answers never leave the node: what a node
//! shares is `EvalCounts`, how many cases and checks passed.
//!
//! The suite file is JSON Lines, one case per line (blank lines and lines starting with
//! `#` are skipped):
//!
//! ```text
//! {"name": "capital", "prompt": "What is the capital of France?", "contains_any": ["Paris"]}
//! {"prompt": "Reply with a JSON object with a key \"ok\".", "json_schema": {"type": "object", "required": ["ok"]}, "max_tokens": 48}
//! {"prompt": "What is 2 + 2? Answer with a number.", "regex": "\\b4\\b", "max_chars": 40, "min_score": 1.0}
//! ```
//!
//! Checks: `exact` (the trimmed answer equals it), `contains_any` (the answer contains one
//! of them, ignoring case), `regex` (matches somewhere in the answer), `json_schema` (the
//! answer, without a Markdown code fence, is JSON valid against the schema), `max_chars`
//! (the answer is at most that long). A case passes when the fraction of its checks that
//! hold reaches its `min_score` (default 1: all of them). Answers are greedy (temperature
//! 0), `max_tokens` long at most (default 64).
//!
//! One line may instead hold the suite's settings: `{"compare_with_previous": true}` has
//! each node run the suite on the version it serves now too, and report how many cases
//! that one passed (`EvalCounts::previous_passed`); the gate then also fails a version
//! that passes `MAX_CASES_LOST` more cases fewer than its predecessor on the median node
//! (one case may come out differently between two runs of the same model on a node
//! under load: the engine batches the suite with live requests).

use serde::{Deserialize, Serialize};

pub const MAX_CASES: usize = 64;
pub const MAX_PROMPT_LEN: usize = 4096;
pub const MAX_EXPECTED_LEN: usize = 4096;
pub const MAX_CASE_TOKENS: u32 = 512;
pub const DEFAULT_CASE_TOKENS: u32 = 64;
/// A suite file (or the suite in a manifest) larger than this is refused.
pub const MAX_SUITE_BYTES: usize = 64 * 1024;
/// With a suite that compares: how many fewer cases than the previous version a new one
/// may pass on the median node without failing the gate.
pub const MAX_CASES_LOST: f64 = 1.0;
/// The fraction of cases that must pass when the publisher names none.
pub const DEFAULT_MIN_PASS_RATE: f64 = 0.8;
/// Compiled regular expressions stay under this size (a hostile pattern cannot blow up).
const REGEX_SIZE_LIMIT: usize = 1 << 20;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalSuite {
    pub cases: Vec<EvalCase>,
    /// Run the suite on the version a node serves now as well, and report how many of
    /// its cases that version passed beside the new version's counts: the new version
    /// then also fails when it passes more than `MAX_CASES_LOST` fewer (median node).
    #[serde(default)]
    pub compare_with_previous: bool,
}

/// The one line of a suite file that is not a case: settings of the whole suite.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SuiteLine {
    compare_with_previous: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalCase {
    pub name: String,
    pub prompt: String,
    pub max_tokens: u32,
    pub checks: Checks,
    /// The fraction of its checks that must hold for the case to pass, in (0, 1].
    pub min_score: f64,
}

/// What an answer must satisfy. The JSON schema is kept as JSON text: the manifest's
/// binary encoding cannot carry free-form JSON values.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Checks {
    pub exact: Option<String>,
    #[serde(default)]
    pub contains_any: Vec<String>,
    pub regex: Option<String>,
    pub json_schema: Option<String>,
    pub max_chars: Option<u32>,
}

/// A suite file that cannot be used, and where.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct SuiteError {
    /// 1-based; 0 for the file as a whole.
    pub line: usize,
    pub message: String,
}

/// One line of a suite file, as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseLine {
    name: Option<String>,
    prompt: String,
    max_tokens: Option<u32>,
    exact: Option<String>,
    #[serde(default)]
    contains_any: Vec<String>,
    regex: Option<String>,
    json_schema: Option<serde_json::Value>,
    max_chars: Option<u32>,
    min_score: Option<f64>,
}

/// How one answer fared.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseOutcome {
    pub checks: u32,
    pub checks_passed: u32,
    pub passed: bool,
    /// Each check that did not hold, in words.
    pub failures: Vec<String>,
}

/// A node's results of a suite on one version: counts only, never prompts or answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalCounts {
    pub cases: u32,
    pub passed: u32,
    pub checks: u32,
    pub checks_passed: u32,
    /// With a suite that compares: the cases the version served before passed, run by
    /// the same node just before (None: no comparison, or nothing served before).
    #[serde(default)]
    pub previous_passed: Option<u32>,
}

impl EvalCounts {
    pub fn add(&mut self, outcome: &CaseOutcome) {
        self.cases = self.cases.saturating_add(1);
        self.passed = self.passed.saturating_add(u32::from(outcome.passed));
        self.checks = self.checks.saturating_add(outcome.checks);
        self.checks_passed = self.checks_passed.saturating_add(outcome.checks_passed);
    }

    /// The fraction of cases that passed (None before any ran, or for counts that do
    /// not add up, which a remote record may claim).
    pub fn pass_rate(&self) -> Option<f64> {
        (self.cases > 0 && self.passed <= self.cases).then(|| self.passed as f64 / self.cases as f64)
    }

    /// The cases the new version passed minus those the previous version passed
    /// (negative: fewer), when compared and the counts add up.
    pub fn margin_over_previous(&self) -> Option<f64> {
        let previous = self.previous_passed.filter(|p| *p <= self.cases)?;
        self.pass_rate()?;
        Some(f64::from(self.passed) - f64::from(previous))
    }
}

impl EvalSuite {
    /// Reads a suite file (JSON Lines); an error names the line.
    pub fn parse_jsonl(text: &str) -> Result<Self, SuiteError> {
        if text.len() > MAX_SUITE_BYTES {
            return Err(SuiteError { line: 0, message: format!("larger than {MAX_SUITE_BYTES} bytes") });
        }
        let mut cases = vec![];
        let mut compare_with_previous = None;
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let at = |message: String| SuiteError { line, message };
            let value: serde_json::Value = serde_json::from_str(trimmed).map_err(|e| at(format!("not a case: {e}")))?;
            if value.get("compare_with_previous").is_some() {
                let settings: SuiteLine =
                    serde_json::from_value(value).map_err(|e| at(format!("not the suite's settings: {e}")))?;
                if compare_with_previous.replace(settings.compare_with_previous).is_some() {
                    return Err(at("compare_with_previous is given twice".into()));
                }
                continue;
            }
            let c: CaseLine = serde_json::from_value(value).map_err(|e| at(format!("not a case: {e}")))?;
            let json_schema = c.json_schema.map(|s| s.to_string());
            let case = EvalCase {
                name: c.name.unwrap_or_else(|| format!("line {line}")),
                prompt: c.prompt,
                max_tokens: c.max_tokens.unwrap_or(DEFAULT_CASE_TOKENS),
                checks: Checks {
                    exact: c.exact,
                    contains_any: c.contains_any,
                    regex: c.regex,
                    json_schema,
                    max_chars: c.max_chars,
                },
                min_score: c.min_score.unwrap_or(1.0),
            };
            case.validate().map_err(at)?;
            cases.push(case);
            if cases.len() > MAX_CASES {
                return Err(at(format!("more than {MAX_CASES} cases")));
            }
        }
        if cases.is_empty() {
            return Err(SuiteError { line: 0, message: "no case in the file".into() });
        }
        Ok(EvalSuite { cases, compare_with_previous: compare_with_previous.unwrap_or(false) })
    }

    /// Checks a suite as it arrives in a manifest: the limits, and every pattern and
    /// schema compiles.
    pub fn validate(&self) -> Result<(), String> {
        if self.cases.is_empty() || self.cases.len() > MAX_CASES {
            return Err(format!("an evaluation suite holds 1 to {MAX_CASES} cases"));
        }
        if self.text_len() > MAX_SUITE_BYTES {
            return Err(format!("an evaluation suite's text is at most {MAX_SUITE_BYTES} bytes"));
        }
        for (i, c) in self.cases.iter().enumerate() {
            c.validate().map_err(|e| format!("case {} ({}): {e}", i + 1, c.name))?;
        }
        Ok(())
    }

    /// The bytes of its prompts, names and expected answers (what it adds to a manifest).
    pub fn text_len(&self) -> usize {
        self.cases
            .iter()
            .map(|c| {
                let k = &c.checks;
                let expected = k.exact.iter().chain(&k.contains_any).chain(&k.regex).chain(&k.json_schema);
                c.name.len() + c.prompt.len() + expected.map(String::len).sum::<usize>()
            })
            .sum()
    }

    /// Runs the checks of every case on its answer (`answers[i]` for `cases[i]`).
    pub fn score<'a>(&self, answers: impl IntoIterator<Item = &'a str>) -> (EvalCounts, Vec<CaseOutcome>) {
        let mut counts = EvalCounts::default();
        let outcomes: Vec<CaseOutcome> = self.cases.iter().zip(answers).map(|(c, a)| c.check(a)).collect();
        for o in &outcomes {
            counts.add(o);
        }
        (counts, outcomes)
    }
}

impl EvalCase {
    fn validate(&self) -> Result<(), String> {
        let c = &self.checks;
        if self.name.len() > 128 {
            return Err("name is longer than 128 bytes".into());
        }
        if self.prompt.trim().is_empty() || self.prompt.len() > MAX_PROMPT_LEN {
            return Err(format!("prompt must be 1 to {MAX_PROMPT_LEN} bytes"));
        }
        if self.max_tokens == 0 || self.max_tokens > MAX_CASE_TOKENS {
            return Err(format!("max_tokens must be 1 to {MAX_CASE_TOKENS}"));
        }
        if !(self.min_score > 0.0 && self.min_score <= 1.0) {
            return Err("min_score must be in (0, 1]".into());
        }
        if self.check_count() == 0 {
            return Err("no check: give exact, contains_any, regex, json_schema or max_chars".into());
        }
        let expected = c.exact.iter().chain(&c.contains_any).chain(&c.regex).chain(&c.json_schema);
        if expected.map(String::len).sum::<usize>() > MAX_EXPECTED_LEN || c.contains_any.len() > 32 {
            return Err(format!("expected answers longer than {MAX_EXPECTED_LEN} bytes, or over 32 of them"));
        }
        if let Some(r) = &c.regex {
            compile_regex(r)?;
        }
        if let Some(s) = &c.json_schema {
            compile_schema(s)?;
        }
        Ok(())
    }

    fn check_count(&self) -> u32 {
        let c = &self.checks;
        u32::from(c.exact.is_some())
            + u32::from(!c.contains_any.is_empty())
            + u32::from(c.regex.is_some())
            + u32::from(c.json_schema.is_some())
            + u32::from(c.max_chars.is_some())
    }

    /// Every check of this case on `answer`.
    pub fn check(&self, answer: &str) -> CaseOutcome {
        let c = &self.checks;
        let mut failures = vec![];
        let trimmed = answer.trim();
        if let Some(want) = &c.exact {
            if trimmed != want.trim() {
                failures.push(format!("answer is not exactly {want:?}"));
            }
        }
        if !c.contains_any.is_empty() {
            let lower = answer.to_lowercase();
            if !c.contains_any.iter().any(|w| lower.contains(&w.to_lowercase())) {
                failures.push(format!("answer contains none of {:?}", c.contains_any));
            }
        }
        if let Some(r) = &c.regex {
            match compile_regex(r) {
                Ok(re) if re.is_match(answer) => {}
                Ok(_) => failures.push(format!("answer does not match /{r}/")),
                Err(e) => failures.push(e),
            }
        }
        if let Some(s) = &c.json_schema {
            if let Err(e) = json_against(s, trimmed) {
                failures.push(e);
            }
        }
        if let Some(max) = c.max_chars {
            let n = answer.chars().count();
            if n > max as usize {
                failures.push(format!("answer is {n} characters, more than {max}"));
            }
        }
        let checks = self.check_count();
        let checks_passed = checks.saturating_sub(failures.len() as u32);
        let passed = checks > 0 && checks_passed as f64 >= self.min_score * checks as f64 - 1e-9;
        CaseOutcome { checks, checks_passed, passed, failures }
    }
}

fn compile_regex(pattern: &str) -> Result<regex::Regex, String> {
    regex::RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| format!("regex {pattern:?} does not compile: {e}"))
}

fn compile_schema(text: &str) -> Result<jsonschema::Validator, String> {
    let schema: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("json_schema is not JSON: {e}"))?;
    jsonschema::validator_for(&schema).map_err(|e| format!("json_schema is not a valid schema: {e}"))
}

/// The answer as JSON (inside a Markdown code fence or not), against the schema.
fn json_against(schema: &str, answer: &str) -> Result<(), String> {
    let body = answer
        .strip_prefix("```json")
        .or_else(|| answer.strip_prefix("```"))
        .and_then(|a| a.trim_end().strip_suffix("```"))
        .unwrap_or(answer)
        .trim();
    let value: serde_json::Value = serde_json::from_str(body).map_err(|e| format!("answer is not JSON: {e}"))?;
    let validator = compile_schema(schema)?;
    let first = validator.iter_errors(&value).next().map(|e| e.to_string());
    match first {
        None => Ok(()),
        Some(e) => Err(format!("answer is JSON but not valid against the schema: {e}")),
    }
}

#[cfg(test)]
mod tests;
