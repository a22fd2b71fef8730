//! `--trace FILE` and `--round-log FILE`: what the server did, one JSON object per line, with the
//! time in ms since training started (`t_ms`).
//!
//! Events (`key` is the tensor; `part` its part's index, present when the tensor has several):
//! - `{"event":"round_closed","key","round","participants":[..],"partial"?,"missing","folded",
//!   "late":[{"worker","clock","weight","parts"?}]?,"cause","t_ms"}`: a key round closed (barrier
//!   policies); `folded` late gradients were added into it with the weights listed (into the
//!   parts listed, when the tensor has several and the gradient did not reach them all in this
//!   round). `cause` is `all_arrived`, `timeout`, or `slow_skipped` (adaptive: every worker not
//!   written off as persistently slow arrived).
//! - `{"event":"push_applied","worker","key","part"?,"clock","t_ms"}`: a push applied as it
//!   arrived (vector clocks).
//! - `{"event":"pull_served","worker","key","part"?,"clock","min_clock","t_ms"}`: a worker's read
//!   at `clock` was served while the slowest clock was `min_clock` (for a barrier both are the
//!   round of the model).
//! - `{"event":"late","worker","key","part"?,"clock","round","action":"fold"|"drop","weight"?,
//!   "t_ms"}`: a gradient computed on round `clock` arrived while `round` was open.
//!
//! The round log is the same file with `round_closed` lines only.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::tensors::KeyRound;
use super::ServerError;
use crate::sync::CloseCause;
use crate::{Clock, Rank};

#[derive(Serialize)]
struct Late<'a> {
    worker: Rank,
    clock: Clock,
    weight: f32,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    parts: &'a [u32],
}

#[derive(Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Record<'a> {
    RoundClosed {
        key: u32,
        round: Clock,
        participants: &'a [Rank],
        #[serde(skip_serializing_if = "<[_]>::is_empty")]
        partial: &'a [(Rank, Vec<u32>)],
        missing: usize,
        folded: usize,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        late: Vec<Late<'a>>,
        cause: &'static str,
        t_ms: f64,
    },
    PushApplied {
        worker: Rank,
        key: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        part: Option<u32>,
        clock: Clock,
        t_ms: f64,
    },
    PullServed {
        worker: Rank,
        key: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        part: Option<u32>,
        clock: Clock,
        min_clock: Clock,
        t_ms: f64,
    },
    Late {
        worker: Rank,
        key: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        part: Option<u32>,
        clock: Clock,
        round: Clock,
        action: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        weight: Option<f32>,
        t_ms: f64,
    },
}

/// A part as the trace names it: its tensor, and its index there when the tensor has several.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PartName {
    /// The tensor.
    pub key: u32,
    /// The part's index within the tensor, if it has several.
    pub part: Option<u32>,
}

#[derive(Debug)]
struct Sink {
    path: PathBuf,
    out: BufWriter<File>,
}

/// The trace and the round log. See the [module documentation](self).
#[derive(Debug, Default)]
pub(crate) struct Trace {
    all: Option<Sink>,
    rounds: Option<Sink>,
}

fn open(path: &Path) -> Result<Sink, ServerError> {
    let out = File::create(path).map_err(|source| ServerError::Trace {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(Sink {
        path: path.to_path_buf(),
        out: BufWriter::new(out),
    })
}

impl Sink {
    fn write(&mut self, rec: &Record<'_>) -> Result<(), ServerError> {
        serde_json::to_writer(&mut self.out, rec)
            .map_err(io::Error::from)
            .and_then(|_| self.out.write_all(b"\n"))
            .map_err(|source| ServerError::Trace {
                path: self.path.clone(),
                source,
            })
    }

    fn flush(&mut self) -> Result<(), ServerError> {
        self.out.flush().map_err(|source| ServerError::Trace {
            path: self.path.clone(),
            source,
        })
    }
}

impl Trace {
    /// Creates (truncates) the files asked for: every event to `trace`, closed rounds to
    /// `round_log`.
    pub fn create(trace: Option<&Path>, round_log: Option<&Path>) -> Result<Self, ServerError> {
        Ok(Self {
            all: trace.map(open).transpose()?,
            rounds: round_log.map(open).transpose()?,
        })
    }

    /// Whether per-push events are wanted (they are built only then).
    pub fn detailed(&self) -> bool {
        self.all.is_some()
    }

    fn write(&mut self, rec: &Record<'_>, is_round: bool) -> Result<(), ServerError> {
        if let Some(s) = self.all.as_mut() {
            s.write(rec)?;
        }
        match self.rounds.as_mut() {
            Some(s) if is_round => s.write(rec),
            _ => Ok(()),
        }
    }

    /// A key round closed.
    pub fn round_closed(&mut self, r: &KeyRound, t_ms: f64) -> Result<(), ServerError> {
        if self.all.is_none() && self.rounds.is_none() {
            return Ok(());
        }
        let rec = Record::RoundClosed {
            key: r.key,
            round: r.round,
            participants: &r.participants,
            partial: &r.partial,
            missing: r.missing,
            folded: r.folded.len(),
            late: r
                .folded
                .iter()
                .map(|f| Late {
                    worker: f.rank,
                    clock: f.clock,
                    weight: f.weight,
                    parts: &f.parts,
                })
                .collect(),
            cause: match r.cause {
                CloseCause::AllArrived => "all_arrived",
                CloseCause::Timeout => "timeout",
                CloseCause::SlowSkipped => "slow_skipped",
            },
            t_ms,
        };
        self.write(&rec, true)
    }

    /// A push was applied as it arrived.
    pub fn push_applied(
        &mut self,
        worker: Rank,
        at: PartName,
        clock: Clock,
        t_ms: f64,
    ) -> Result<(), ServerError> {
        let rec = Record::PushApplied {
            worker,
            key: at.key,
            part: at.part,
            clock,
            t_ms,
        };
        self.write(&rec, false)
    }

    /// A read was served.
    pub fn pull_served(
        &mut self,
        worker: Rank,
        at: PartName,
        clock: Clock,
        min_clock: Clock,
        t_ms: f64,
    ) -> Result<(), ServerError> {
        let rec = Record::PullServed {
            worker,
            key: at.key,
            part: at.part,
            clock,
            min_clock,
            t_ms,
        };
        self.write(&rec, false)
    }

    /// A late gradient was folded (`weight`) or dropped (`None`).
    pub fn late(
        &mut self,
        worker: Rank,
        at: PartName,
        (clock, round): (Clock, Clock),
        weight: Option<f32>,
        t_ms: f64,
    ) -> Result<(), ServerError> {
        let rec = Record::Late {
            worker,
            key: at.key,
            part: at.part,
            clock,
            round,
            action: if weight.is_some() { "fold" } else { "drop" },
            weight,
            t_ms,
        };
        self.write(&rec, false)
    }

    /// Writes out what is buffered.
    pub fn flush(&mut self) -> Result<(), ServerError> {
        for s in [self.all.as_mut(), self.rounds.as_mut()]
            .into_iter()
            .flatten()
        {
            s.flush()?;
        }
        Ok(())
    }
}
