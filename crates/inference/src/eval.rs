//! Runs an evaluation suite (`slmesh_protocol::eval`) on a loaded version: each case's
//! prompt as one user turn through the model's chat template, greedy, at most its
//! `max_tokens`. The protocol core judges the answers; they stay in this process (the
//! node shares only the counts, and never logs an answer).

use crate::{InferenceError, LoadedModel, Result};
use mistralrs::{RequestBuilder, TextMessageRole, TextMessages};
use slmesh_protocol::eval::{CaseOutcome, EvalCounts, EvalSuite};
use std::time::Instant;

/// One case as it ran.
#[derive(Debug, Clone)]
pub struct CaseRun {
    pub name: String,
    pub answer: String,
    pub outcome: CaseOutcome,
    pub secs: f64,
}

/// A whole suite as it ran.
#[derive(Debug, Clone)]
pub struct SuiteRun {
    pub counts: EvalCounts,
    pub cases: Vec<CaseRun>,
    pub secs: f64,
}

impl LoadedModel {
    /// Answers every case of `suite` and checks the answers.
    pub async fn run_suite(&self, suite: &EvalSuite) -> Result<SuiteRun> {
        let started = Instant::now();
        let mut counts = EvalCounts::default();
        let mut cases = Vec::with_capacity(suite.cases.len());
        for case in &suite.cases {
            let began = Instant::now();
            let request = RequestBuilder::from(TextMessages::new().add_message(TextMessageRole::User, &case.prompt))
                .set_deterministic_sampler()
                .set_sampler_max_len(case.max_tokens as usize);
            let response = self.chat(request).await.map_err(|e| match e {
                InferenceError::Generation(why) => {
                    InferenceError::Generation(format!("evaluation case {:?}: {why}", case.name))
                }
                other => other,
            })?;
            let answer = response.choices.first().and_then(|c| c.message.content.clone()).unwrap_or_default();
            let outcome = case.check(&answer);
            counts.add(&outcome);
            cases.push(CaseRun { name: case.name.clone(), answer, outcome, secs: began.elapsed().as_secs_f64() });
        }
        Ok(SuiteRun { counts, cases, secs: started.elapsed().as_secs_f64() })
    }
}
