//! `train --world-size W`: data-parallel training over NCCL, one process per GPU (a binary
//! built with `--features nccl`).
//!
//! The process the user starts is rank 0. Before loading anything it makes the NCCL id and
//! starts ranks 1..W as copies of itself with `--world-rank r`, the id in [`ID_ENV`]. Each rank loads
//! the model on `cuda:N+r` (`--device cuda:N`), joins the group right before training and
//! trains on its share of every step (`Trainer::run_data_parallel`). Only rank 0 writes: the
//! output folder, checkpoints, the adapter, `--merge` and the results; the other ranks exit when
//! training ends. Rank 0 waits for them and fails when one did. A rank that dies mid-run stops
//! the whole run at once: the others would wait for it in the next all-reduce forever.

use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{Context, bail};
use candle_core::Device;
use candle_peft::train::Collective;

use crate::cli::args::{DeviceArg, TrainArgs};

/// The environment variable that carries the NCCL id (hex) from rank 0 to the ranks it starts.
pub const ID_ENV: &str = "CANDLE_PEFT_NCCL_ID";

/// This process's place in a data-parallel run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// This rank.
    pub rank: usize,
    /// The number of ranks.
    pub world_size: usize,
    /// The NCCL id, as hex (read only when joining, which needs the `nccl` feature).
    #[cfg_attr(not(feature = "nccl"), allow(dead_code))]
    id_hex: String,
}

impl Plan {
    /// The device of this rank: `cuda:N+rank` for `--device cuda:N`.
    pub fn device(&self, device: DeviceArg) -> DeviceArg {
        match device {
            DeviceArg::Cuda(n) => DeviceArg::Cuda(n + self.rank),
            DeviceArg::Cpu => DeviceArg::Cpu,
        }
    }

    /// Whether this rank writes the run's output (rank 0).
    pub fn writes_output(plan: Option<&Self>) -> bool {
        plan.is_none_or(|p| p.rank == 0)
    }
}

/// The flags' own checks: the error names the flag.
pub fn check(args: &TrainArgs) -> anyhow::Result<()> {
    match (args.world_size, args.world_rank) {
        (None, None) => return Ok(()),
        (None, Some(_)) => bail!("--world-rank is set by `--world-size`'s launcher, not by hand"),
        (Some(0), _) => bail!("--world-size must be at least 1 (got 0)"),
        (Some(w), Some(r)) if r >= w => bail!("--world-rank {r} is not below --world-size {w}"),
        _ => {}
    }
    if !cfg!(feature = "nccl") {
        bail!(
            "--world-size trains over NCCL: it needs a binary built with `--features nccl` \
             (this one was built without)"
        );
    }
    if args.device == DeviceArg::Cpu {
        bail!("--world-size runs one process per GPU: it needs --device cuda (or cuda:N)");
    }
    Ok(())
}

/// Rank 0 of a data-parallel run starts the other ranks; the plan of this process, and the
/// ranks it started.
pub fn launch(args: &TrainArgs) -> anyhow::Result<(Option<Plan>, Option<Launched>)> {
    check(args)?;
    let Some(world_size) = args.world_size else {
        return Ok((None, None));
    };
    if let Some(rank) = args.world_rank {
        let id_hex = std::env::var(ID_ENV)
            .with_context(|| format!("rank {rank}: {ID_ENV} is not set (its launcher sets it)"))?;
        let plan = Plan {
            rank,
            world_size,
            id_hex,
        };
        return Ok((Some(plan), None));
    }
    let id_hex = new_id_hex()?;
    let exe = std::env::current_exe().context("locating this binary to start the other ranks")?;
    let mut children = Vec::new();
    for rank in 1..world_size {
        let child = std::process::Command::new(&exe)
            .args(std::env::args_os().skip(1))
            .args(["--world-rank", &rank.to_string()])
            .env(ID_ENV, &id_hex)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("starting rank {rank} ({})", exe.display()))?;
        children.push((rank, child));
    }
    let plan = Plan {
        rank: 0,
        world_size,
        id_hex,
    };
    Ok((Some(plan), Some(Launched::watch(children))))
}

#[cfg(feature = "nccl")]
fn new_id_hex() -> anyhow::Result<String> {
    Ok(candle_peft::train::nccl::NcclId::new()?.to_hex())
}

#[cfg(not(feature = "nccl"))]
fn new_id_hex() -> anyhow::Result<String> {
    bail!("--world-size needs a binary built with `--features nccl`")
}

/// Joins the group of `plan` on `device` (this rank's); `None` outside a data-parallel run.
pub fn join(plan: Option<&Plan>, device: &Device) -> anyhow::Result<Option<Box<dyn Collective>>> {
    let Some(plan) = plan else {
        return Ok(None);
    };
    join_nccl(plan, device)
        .with_context(|| format!("rank {} of {}: joining NCCL", plan.rank, plan.world_size))
}

#[cfg(feature = "nccl")]
fn join_nccl(plan: &Plan, device: &Device) -> anyhow::Result<Option<Box<dyn Collective>>> {
    use candle_peft::train::nccl::{NcclId, NcclRank};
    let id = NcclId::from_hex(&plan.id_hex)?;
    let rank = NcclRank::join(device, plan.rank, plan.world_size, id)?;
    Ok(Some(Box::new(rank)))
}

#[cfg(not(feature = "nccl"))]
fn join_nccl(_: &Plan, _: &Device) -> anyhow::Result<Option<Box<dyn Collective>>> {
    bail!("--world-size needs a binary built with `--features nccl`")
}

/// The ranks rank 0 started, watched: one that fails stops the run.
pub struct Launched {
    children: Arc<Mutex<Vec<(usize, Child)>>>,
    finished: Arc<AtomicBool>,
    watcher: Option<JoinHandle<()>>,
}

impl Launched {
    fn watch(children: Vec<(usize, Child)>) -> Self {
        let children = Arc::new(Mutex::new(children));
        let finished = Arc::new(AtomicBool::new(false));
        let watcher = {
            let (children, finished) = (Arc::clone(&children), Arc::clone(&finished));
            std::thread::spawn(move || {
                while !finished.load(Ordering::Relaxed) {
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    let Ok(mut list) = children.lock() else {
                        return;
                    };
                    let failed = list
                        .iter_mut()
                        .find_map(|(rank, child)| match child.try_wait() {
                            Ok(Some(status)) if !status.success() => Some((*rank, status)),
                            _ => None,
                        });
                    if let Some((rank, status)) = failed {
                        for (_, child) in list.iter_mut() {
                            let _ = child.kill();
                        }
                        eprintln!("train: rank {rank} failed ({status}); the run is stopped");
                        std::process::exit(1);
                    }
                }
            })
        };
        Self {
            children,
            finished,
            watcher: Some(watcher),
        }
    }

    /// Waits for every rank this process started; an error names a rank that failed.
    pub fn finish(mut self) -> anyhow::Result<()> {
        self.finished.store(true, Ordering::Relaxed);
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
        let mut list = self
            .children
            .lock()
            .map_err(|_| anyhow::anyhow!("the rank watcher panicked"))?;
        for (rank, child) in list.iter_mut() {
            let status = child
                .wait()
                .with_context(|| format!("waiting for rank {rank}"))?;
            if !status.success() {
                bail!("rank {rank} failed ({status})");
            }
        }
        list.clear();
        Ok(())
    }
}

impl Drop for Launched {
    /// Rank 0 failed before the others finished: they would wait for it forever.
    fn drop(&mut self) {
        self.finished.store(true, Ordering::Relaxed);
        if let Ok(mut list) = self.children.lock() {
            for (_, child) in list.iter_mut() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
