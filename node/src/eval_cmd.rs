//! `slmesh eval --model FILE --suite FILE`: an evaluation suite run on a GGUF on this
//! machine, the way a node runs it before serving a version, so that a broken build is
//! caught before it is signed.

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use slmesh_inference::eval::SuiteRun;
use slmesh_inference::{LoadOptions, LoadedModel, ModelSpec};
use slmesh_protocol::eval::DEFAULT_MIN_PASS_RATE;
use std::fmt::Write;
use std::path::PathBuf;

pub(crate) const SUITE_FORMAT: &str = "\
Runs an evaluation suite on a GGUF file, as a node does before it serves a version
(`slmesh manifest create --eval FILE` puts the suite in the manifest), and prints each
case's answer and checks. Exits 0 when the share of cases passed reaches
--min-pass-rate, 1 otherwise.

The suite is JSON Lines: one case per line; blank lines and lines starting with # are
skipped. A case has a prompt, one or more checks, and optionally a name, max_tokens
(default 64, at most 512) and min_score (the share of its checks that must hold; default
1, all of them):

  {\"name\": \"capital\", \"prompt\": \"What is the capital of France?\", \"contains_any\": [\"Paris\"]}
  {\"prompt\": \"Reply with a JSON object with a key ok.\", \"json_schema\": {\"type\": \"object\", \"required\": [\"ok\"]}}
  {\"prompt\": \"What is 2 + 2?\", \"regex\": \"\\\\b4\\\\b\", \"max_chars\": 40}

One line may hold the suite's settings instead of a case: {\"compare_with_previous\": true}
has every node run the suite on the version it serves as well, and the rollout then also
fails a version that passes more than one case fewer than that one (median node).

With --compare-with OLD.gguf the suite also runs on OLD, and each answer is scored
for how far it agrees with OLD's (chrF, 0 to 1), as shadow comparison scores live
answers on a canary: the median is a guide to `manifest create --min-agreement`.

Checks: exact (the trimmed answer equals it), contains_any (contains one of them,
ignoring case), regex (matches somewhere), json_schema (the answer, inside a Markdown
code fence or not, is JSON valid against the schema), max_chars (at most that many
characters). Answers are greedy (temperature 0), through the model's chat template. At
most 64 cases, 64 KiB of text. A file that cannot be used gets an error naming its line.";

#[derive(Args)]
pub struct EvalArgs {
    /// The GGUF file to evaluate.
    #[arg(long)]
    pub model: PathBuf,
    /// The evaluation suite (JSON Lines; see above).
    #[arg(long)]
    pub suite: PathBuf,
    /// The share of cases that must pass, in [0, 1] (what `manifest create
    /// --min-eval-pass-rate` gates a rollout on).
    #[arg(long, default_value_t = DEFAULT_MIN_PASS_RATE)]
    pub min_pass_rate: f64,
    /// Also run the suite on this GGUF (the version now served, say) and score how far
    /// each answer of --model agrees with its answer (chrF, 0 to 1), as shadow comparison
    /// does on live traffic: the median tells what `manifest create --min-agreement` to
    /// set.
    #[arg(long, value_name = "FILE")]
    pub compare_with: Option<PathBuf>,
    /// With --compare-with: exit 1 when the median agreement is below this.
    #[arg(long, value_name = "SCORE", requires = "compare_with")]
    pub min_agreement: Option<f64>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The answers of --model against those of --compare-with.
#[derive(Serialize)]
struct Agreement {
    compared_with: String,
    /// Each case's score, in the suite's order.
    per_case: Vec<f64>,
    median: f64,
    min_agreement: Option<f64>,
}

impl Agreement {
    fn of(args: &EvalArgs, run: &SuiteRun, baseline: &SuiteRun) -> Option<Self> {
        let path = args.compare_with.as_ref()?;
        let per_case: Vec<f64> = run
            .cases
            .iter()
            .zip(&baseline.cases)
            .map(|(c, b)| slmesh_protocol::shadow::agreement(&c.answer, &b.answer))
            .collect();
        let mut sorted = per_case.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = match n {
            0 => 0.0,
            _ if n % 2 == 1 => sorted[n / 2],
            _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        };
        Some(Agreement {
            compared_with: path.display().to_string(),
            per_case,
            median,
            min_agreement: args.min_agreement,
        })
    }

    fn ok(&self) -> bool {
        self.min_agreement.is_none_or(|min| self.median + 1e-9 >= min)
    }
}

#[derive(Serialize)]
struct CaseReport<'a> {
    name: &'a str,
    passed: bool,
    checks: u32,
    checks_passed: u32,
    failures: &'a [String],
    answer: &'a str,
    secs: f64,
}

#[derive(Serialize)]
struct Report<'a> {
    model: String,
    cases: u32,
    passed: u32,
    checks: u32,
    checks_passed: u32,
    pass_rate: f64,
    min_pass_rate: f64,
    ok: bool,
    secs: f64,
    results: Vec<CaseReport<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    agreement: Option<&'a Agreement>,
}

pub fn run(args: EvalArgs, options: LoadOptions) -> Result<()> {
    crate::init_logging(false);
    if !(0.0..=1.0).contains(&args.min_pass_rate) {
        bail!("--min-pass-rate {} is not in [0, 1]", args.min_pass_rate);
    }
    let suite = crate::manifest_cmd::read_suite(&args.suite)?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the runtime")?;
    let spec = ModelSpec { name: "eval".into(), version: 1, gguf: args.model.clone() };
    if !args.json {
        eprintln!("loading {} ...", args.model.display());
    }
    if let Some(min) = args.min_agreement {
        if !(0.0..=1.0).contains(&min) {
            bail!("--min-agreement {min} is not in [0, 1]");
        }
    }
    let (run, baseline) = runtime.block_on(async {
        let model = LoadedModel::load_with(spec, options).await.context("the model cannot be loaded")?;
        let run = model.run_suite(&suite).await.context("the suite could not run")?;
        // One model in memory at a time.
        drop(model);
        let Some(path) = &args.compare_with else { return Ok::<_, anyhow::Error>((run, None)) };
        if !args.json {
            eprintln!("loading {} to compare with ...", path.display());
        }
        let spec = ModelSpec { name: "baseline".into(), version: 1, gguf: path.clone() };
        let model =
            LoadedModel::load_with(spec, options).await.context("the model to compare with cannot be loaded")?;
        let baseline = model.run_suite(&suite).await.context("the suite could not run on the model to compare with")?;
        Ok((run, Some(baseline)))
    })?;
    let agreement = baseline.as_ref().and_then(|b| Agreement::of(&args, &run, b));
    let rate = run.counts.pass_rate().unwrap_or(0.0);
    let ok = rate + 1e-9 >= args.min_pass_rate;
    if args.json {
        let mut report = report(&args, &run, rate, ok && agreement.as_ref().is_none_or(Agreement::ok));
        report.agreement = agreement.as_ref();
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", text(&args, &run, rate, ok, agreement.as_ref()));
    }
    if let Some(a) = agreement.as_ref().filter(|a| !a.ok()) {
        bail!(
            "the answers agree {:.2} (median) with those of {}, below {:.2}",
            a.median,
            a.compared_with,
            a.min_agreement.unwrap_or_default()
        );
    }
    if !ok {
        bail!(
            "{} of {} case(s) passed ({:.0}%), below {:.0}%",
            run.counts.passed,
            run.counts.cases,
            rate * 100.0,
            args.min_pass_rate * 100.0
        );
    }
    Ok(())
}

fn report<'a>(args: &EvalArgs, run: &'a SuiteRun, rate: f64, ok: bool) -> Report<'a> {
    Report {
        model: args.model.display().to_string(),
        cases: run.counts.cases,
        passed: run.counts.passed,
        checks: run.counts.checks,
        checks_passed: run.counts.checks_passed,
        pass_rate: rate,
        min_pass_rate: args.min_pass_rate,
        ok,
        secs: run.secs,
        results: run
            .cases
            .iter()
            .map(|c| CaseReport {
                name: &c.name,
                passed: c.outcome.passed,
                checks: c.outcome.checks,
                checks_passed: c.outcome.checks_passed,
                failures: &c.outcome.failures,
                answer: &c.answer,
                secs: c.secs,
            })
            .collect(),
        agreement: None,
    }
}

fn text(args: &EvalArgs, run: &SuiteRun, rate: f64, ok: bool, agreement: Option<&Agreement>) -> String {
    let mut out = String::new();
    let width = run.cases.iter().map(|c| c.name.chars().count()).max().unwrap_or(4).min(40);
    for (i, c) in run.cases.iter().enumerate() {
        let verdict = if c.outcome.passed { "PASS" } else { "FAIL" };
        let _ = writeln!(
            out,
            "{verdict}  {:<width$}  {}/{} checks  {:>5.1} s",
            c.name, c.outcome.checks_passed, c.outcome.checks, c.secs
        );
        let answer: String = c.answer.trim().chars().take(160).collect();
        let _ = writeln!(out, "      answer: {answer:?}");
        for f in &c.outcome.failures {
            let _ = writeln!(out, "      - {f}");
        }
        if let Some(score) = agreement.and_then(|a| a.per_case.get(i)) {
            let _ = writeln!(out, "      agreement with the other model's answer: {score:.2}");
        }
    }
    let _ = writeln!(
        out,
        "\n{}: {} of {} case(s) passed ({:.0}%, needs {:.0}%), {} of {} check(s), in {:.1} s: {}",
        args.model.display(),
        run.counts.passed,
        run.counts.cases,
        rate * 100.0,
        args.min_pass_rate * 100.0,
        run.counts.checks_passed,
        run.counts.checks,
        run.secs,
        if ok { "PASS" } else { "FAIL" }
    );
    if let Some(a) = agreement {
        let limit = a.min_agreement.map(|m| format!(", needs {m:.2}")).unwrap_or_default();
        let _ = writeln!(
            out,
            "agreement with {}: median {:.2} over {} answer(s){limit} (chrF; what --min-agreement compares with): {}",
            a.compared_with,
            a.median,
            a.per_case.len(),
            if a.ok() { "PASS" } else { "FAIL" }
        );
    }
    out
}
