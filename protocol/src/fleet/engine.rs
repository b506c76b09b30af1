//! The rollout engine: operator commands, wave progress, and what a node does.

use super::gates::GateVerdict;
use crate::rollout::RolloutPlan;
use crate::signed::{Signed, SignedKind};
use serde::{Deserialize, Serialize};

/// An operator's order about one rollout, signed by a trusted publisher key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutCommand {
    pub model: String,
    pub version: u64,
    pub action: CommandAction,
    /// Unix seconds; also orders the commands of one rollout.
    pub issued_at: u64,
    /// The fleet it is addressed to.
    #[serde(default = "crate::trust::default_fleet")]
    pub fleet: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandAction {
    /// Open no further wave.
    Pause,
    Resume,
    /// Skip the rest of the current wave's soak.
    Promote,
    /// Stop the rollout; nodes that activated the version roll back.
    Abort,
    /// Stop the rollout, and every node goes to version `to` (if it still has its files).
    RollBackTo {
        to: u64,
    },
}

impl SignedKind for RolloutCommand {
    const DOMAIN: &'static [u8] = b"slmesh/rollout-command";
    const WHAT: &'static str = "rollout command";
}

pub type SignedCommand = Signed<RolloutCommand>;

/// What the operators said about one rollout, folded in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorState {
    pub paused: bool,
    pub aborted: bool,
    /// When each promote was issued.
    pub promotions: Vec<u64>,
    /// The version operators ordered every node back to, if they did.
    pub roll_back_to: Option<u64>,
}

impl OperatorState {
    pub fn fold<'a>(commands: impl IntoIterator<Item = &'a RolloutCommand>) -> Self {
        let mut sorted: Vec<&RolloutCommand> = commands.into_iter().collect();
        sorted.sort_by_key(|c| c.issued_at);
        let mut s = OperatorState::default();
        for c in sorted {
            match c.action {
                CommandAction::Pause => s.paused = true,
                CommandAction::Resume => s.paused = false,
                CommandAction::Promote => s.promotions.push(c.issued_at),
                CommandAction::Abort => s.aborted = true,
                CommandAction::RollBackTo { to } => {
                    s.aborted = true;
                    s.roll_back_to = Some(to);
                }
            }
        }
        s
    }
}

/// A rollout's progress as this node sees it: when each wave opened, or why it halted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RolloutProgress {
    /// Unix seconds at which waves 0, 1, ... opened.
    pub opened: Vec<u64>,
    pub halted: Option<String>,
    pub verdict: Option<GateVerdict>,
}

/// One step of the rollout engine. Wave 0 (the canary) opens when the version is
/// published; wave k opens once wave k-1 has soaked (or an operator promoted it) and the
/// gates pass. A failing gate or an abort halts the rollout for good.
pub fn advance(
    progress: &mut RolloutProgress,
    plan: &RolloutPlan,
    published_at: u64,
    verdict: &GateVerdict,
    operator: &OperatorState,
    now: u64,
) {
    progress.verdict = Some(verdict.clone());
    if progress.halted.is_some() {
        return;
    }
    if operator.aborted {
        progress.halted = Some(match operator.roll_back_to {
            Some(to) => format!("an operator rolled back to version {to}"),
            None => "aborted by an operator".into(),
        });
        return;
    }
    if let GateVerdict::Fail(reason) = verdict {
        progress.halted = Some(format!("gate failed: {reason}"));
        return;
    }
    if progress.opened.is_empty() {
        progress.opened.push(published_at.min(now));
    }
    while progress.opened.len() < plan.waves.len() && !operator.paused {
        let k = progress.opened.len();
        let previous_opened = progress.opened[k - 1];
        let soaked = now >= previous_opened.saturating_add(plan.waves[k - 1].soak_secs);
        let promoted = operator.promotions.iter().any(|t| *t >= previous_opened);
        if (soaked || promoted) && *verdict == GateVerdict::Pass {
            progress.opened.push(now);
        } else {
            break;
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RolloutDecision {
    Activate,
    Wait(String),
    RollBack(String),
}

/// What this node does about a staged version, given its wave (None: the plan's selector
/// leaves it out) and whether it serves the version now.
pub fn decide(progress: &RolloutProgress, my_wave: Option<usize>, active_here: bool) -> RolloutDecision {
    if let Some(reason) = &progress.halted {
        return if active_here {
            RolloutDecision::RollBack(reason.clone())
        } else {
            RolloutDecision::Wait(format!("halted: {reason}"))
        };
    }
    match my_wave {
        None => RolloutDecision::Wait("the plan's selector leaves this node out".into()),
        Some(w) if w < progress.opened.len() => RolloutDecision::Activate,
        Some(w) => {
            RolloutDecision::Wait(format!("in wave {} of the plan; {} wave(s) open", w + 1, progress.opened.len()))
        }
    }
}
