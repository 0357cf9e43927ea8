//! Data-parallel training on libtorch's c10d: the world `torchrun` (or a
//! user setting the same variables) describes, and a process group (Gloo on
//! CPUs, NCCL on GPUs) with the collectives the engine needs, SyncBatchNorm
//! among them ([`ProcessGroup::sync_batch_norm`]). Without the variables
//! there is no world and kd runs as a single process.

use std::ffi::{CString, c_char, c_void};
use std::time::Duration;

use tch::Tensor;

#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("distributed: {0}")]
    Env(String),
    #[error("distributed {what} failed: {msg}")]
    Collective { what: &'static str, msg: String },
    /// A collective of a running job failed: a peer exited, was killed or
    /// stopped answering within the timeout. Gloo's and NCCL's messages
    /// name sockets, not ranks, so this says which ranks it can have been.
    #[error(
        "distributed {what} failed on rank {rank} of {size}: {peers} left the job or stopped answering ({msg}); every rank stops, keeping the last epoch's checkpoint; relaunch all {size} ranks with the same command and --resume"
    )]
    PeerLost {
        what: &'static str,
        rank: usize,
        size: usize,
        peers: String,
        msg: String,
    },
}

type RawTensor = *mut c_void;

unsafe extern "C" {
    fn kd_dist_new(
        addr: *const c_char,
        port: i32,
        rank: i32,
        world: i32,
        is_server: i32,
        timeout_ms: i64,
        nccl: i32,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    fn kd_dist_free(g: *mut c_void);
    fn kd_dist_allreduce_sum(g: *mut c_void, ts: *const RawTensor, n: i64) -> *mut c_char;
    fn kd_dist_broadcast(g: *mut c_void, ts: *const RawTensor, n: i64, root: i32) -> *mut c_char;
    fn kd_dist_allgather(
        g: *mut c_void,
        t: RawTensor,
        outs: *const RawTensor,
        n: i64,
    ) -> *mut c_char;
    fn kd_dist_barrier(g: *mut c_void) -> *mut c_char;
    fn kd_dist_sync_batch_norm(
        g: *mut c_void,
        x: RawTensor,
        weight: RawTensor,
        bias: RawTensor,
        running_mean: RawTensor,
        running_var: RawTensor,
        momentum: f64,
        eps: f64,
        out: *mut RawTensor,
    ) -> *mut c_char;
    fn kd_dist_has_nccl() -> i32;
}

fn check(what: &'static str, err: *mut c_char) -> Result<(), DistError> {
    // SAFETY: every shim function returns null or a message from malloc.
    match unsafe { kd_aten::take_error(err) } {
        None => Ok(()),
        Some(msg) => Err(DistError::Collective { what, msg }),
    }
}

fn raw(t: &Tensor) -> RawTensor {
    t.as_ptr() as RawTensor
}

fn raw_or_null(t: Option<&Tensor>) -> RawTensor {
    t.map_or(std::ptr::null_mut(), raw)
}

pub use kd_aten::BatchNormArgs;

/// Whether this build can make NCCL process groups.
pub fn has_nccl() -> bool {
    unsafe { kd_dist_has_nccl() != 0 }
}

/// This process's place in a data-parallel job, from torchrun's variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub size: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// Under torchrun the agent hosts the store; started by hand, rank 0 does.
    pub agent_store: bool,
}

impl World {
    /// The world in the environment: `None` without `WORLD_SIZE` (a single
    /// process); an error when the variables are incomplete or disagree.
    pub fn from_env() -> Result<Option<World>, DistError> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<World>, DistError> {
        let Some(size) = var("WORLD_SIZE") else {
            return Ok(None);
        };
        let num = |k: &str| -> Result<usize, DistError> {
            let v = var(k).ok_or_else(|| {
                DistError::Env(format!(
                    "WORLD_SIZE is set but {k} is not (torchrun sets both)"
                ))
            })?;
            v.trim()
                .parse()
                .map_err(|_| DistError::Env(format!("{k}={v} is not a number")))
        };
        let size: usize = size
            .trim()
            .parse()
            .map_err(|_| DistError::Env(format!("WORLD_SIZE={size} is not a number")))?;
        let rank = num("RANK")?;
        let local_rank = var("LOCAL_RANK").map_or(Ok(rank), |_| num("LOCAL_RANK"))?;
        if size == 0 || rank >= size {
            return Err(DistError::Env(format!(
                "RANK {rank} is not below WORLD_SIZE {size}"
            )));
        }
        let master_port = num("MASTER_PORT")?;
        let master_port = u16::try_from(master_port)
            .map_err(|_| DistError::Env(format!("MASTER_PORT {master_port} is not a port")))?;
        Ok(Some(World {
            rank,
            size,
            local_rank,
            master_addr: var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
            master_port,
            agent_store: var("TORCHELASTIC_USE_AGENT_STORE").as_deref() == Some("True"),
        }))
    }

    pub fn is_main(&self) -> bool {
        self.rank == 0
    }
}

/// A c10d process group over the whole world.
pub struct ProcessGroup {
    raw: *mut c_void,
    pub world: World,
    /// NCCL (CUDA tensors) rather than Gloo (CPU tensors).
    nccl: bool,
}

// SAFETY: c10d process groups are used from one thread at a time here (the
// training loop's), and libtorch allows moving them between threads.
unsafe impl Send for ProcessGroup {}
unsafe impl Sync for ProcessGroup {}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        unsafe { kd_dist_free(self.raw) }
    }
}

impl ProcessGroup {
    /// [`check`] for a collective of the joined job: a failure means a
    /// peer is gone, and the message says which ranks that can be.
    fn check(&self, what: &'static str, err: *mut c_char) -> Result<(), DistError> {
        check(what, err).map_err(|e| match e {
            DistError::Collective { what, msg } => {
                let (rank, size) = (self.world.rank, self.world.size);
                let others: Vec<String> = (0..size)
                    .filter(|&r| r != rank)
                    .map(|r| r.to_string())
                    .collect();
                let peers = match others.as_slice() {
                    [one] => format!("rank {one}"),
                    _ => format!("one of ranks {}", others.join(", ")),
                };
                DistError::PeerLost {
                    what,
                    rank,
                    size,
                    peers,
                    msg,
                }
            }
            other => other,
        })
    }

    /// Joins the job: connects to the store (rank 0 hosts it unless
    /// torchrun's agent does) and builds the group. `timeout` bounds the
    /// rendezvous and every collective: a rank that dies or hangs makes
    /// the others fail after it, not wait for ever.
    pub fn new(world: World, nccl: bool, timeout: Duration) -> Result<ProcessGroup, DistError> {
        let addr = CString::new(world.master_addr.clone())
            .map_err(|_| DistError::Env("MASTER_ADDR holds a NUL byte".into()))?;
        let mut raw = std::ptr::null_mut();
        let server = world.is_main() && !world.agent_store;
        let err = unsafe {
            kd_dist_new(
                addr.as_ptr(),
                i32::from(world.master_port),
                world.rank as i32,
                world.size as i32,
                i32::from(server),
                timeout.as_millis() as i64,
                i32::from(nccl),
                &mut raw,
            )
        };
        check("rendezvous", err).map_err(|e| match e {
            DistError::Collective { msg, .. } => DistError::Env(format!(
                "cannot join the job at {}:{} as rank {} of {}: {msg}",
                world.master_addr, world.master_port, world.rank, world.size
            )),
            other => other,
        })?;
        Ok(ProcessGroup { raw, world, nccl })
    }

    /// Whether any rank passes `true`: one allreduce of a single number on
    /// the device the group's collectives take (a device sync under NCCL).
    pub fn any(&self, flag: bool) -> Result<bool, DistError> {
        let device = if self.nccl {
            tch::Device::Cuda(self.world.local_rank)
        } else {
            tch::Device::Cpu
        };
        let t = Tensor::from_slice(&[f32::from(u8::from(flag))]).to_device(device);
        self.all_reduce_sum(std::slice::from_ref(&t))?;
        Ok(t.double_value(&[]) > 0.0)
    }

    /// Sums each tensor over the ranks, in place.
    pub fn all_reduce_sum(&self, ts: &[Tensor]) -> Result<(), DistError> {
        flat(ts, |t| {
            self.check("allreduce", unsafe {
                kd_dist_allreduce_sum(self.raw, &raw(t), 1)
            })
        })
    }

    /// Copies rank `root`'s tensors into every rank's, in place.
    pub fn broadcast(&self, ts: &[Tensor], root: usize) -> Result<(), DistError> {
        flat(ts, |t| {
            self.check("broadcast", unsafe {
                kd_dist_broadcast(self.raw, &raw(t), 1, root as i32)
            })
        })
    }

    /// Every rank's `t` (all the same shape), in rank order.
    pub fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>, DistError> {
        let t = t.contiguous();
        let outs: Vec<Tensor> = (0..self.world.size).map(|_| t.empty_like()).collect();
        let raws: Vec<RawTensor> = outs.iter().map(raw).collect();
        self.check("allgather", unsafe {
            kd_dist_allgather(self.raw, raw(&t), raws.as_ptr(), raws.len() as i64)
        })?;
        Ok(outs)
    }

    pub fn barrier(&self) -> Result<(), DistError> {
        self.check("barrier", unsafe { kd_dist_barrier(self.raw) })
    }

    /// BatchNorm's training forward over the whole job's batch, as
    /// `torch.nn.SyncBatchNorm`: normalised with the mean and biased
    /// variance of every rank's rows together (one allreduce of per-channel
    /// sum, sum of squares and count), running statistics updated in place
    /// with the global mean and unbiased variance, and a backward that
    /// allreduces the per-channel sums of dy and dy·(x − mean) (a second
    /// allreduce) so that the input gradient is that of one BatchNorm over
    /// the concatenated batch. Weight and bias gradients are this rank's
    /// own: average them over the ranks as any other gradient.
    ///
    /// Every rank must make the same calls in the same order, forward and
    /// backward (each is a collective). In a world of one this is plain
    /// `batch_norm` in training mode, bit for bit.
    pub fn sync_batch_norm(&self, bn: BatchNormArgs) -> Result<Tensor, DistError> {
        if self.world.size == 1 {
            // What tch's `nn::BatchNorm::forward_t` calls: no collective
            // can change one rank's statistics.
            return bn
                .input
                .f_batch_norm(
                    bn.weight,
                    bn.bias,
                    Some(bn.running_mean),
                    Some(bn.running_var),
                    true,
                    bn.momentum,
                    bn.eps,
                    true,
                )
                .map_err(|e| DistError::Collective {
                    what: "sync batchnorm",
                    msg: e.to_string(),
                });
        }
        let mut out: RawTensor = std::ptr::null_mut();
        // SAFETY: the tensors are live for the call; on success the shim
        // hands over a new at::Tensor, owned by the returned Tensor.
        self.check("sync batchnorm", unsafe {
            kd_dist_sync_batch_norm(
                self.raw,
                raw(bn.input),
                raw_or_null(bn.weight),
                raw_or_null(bn.bias),
                raw(bn.running_mean),
                raw(bn.running_var),
                bn.momentum,
                bn.eps,
                &mut out,
            )
        })?;
        Ok(unsafe { Tensor::from_ptr(out.cast()) })
    }

    /// Averages gradients over the ranks in one flat bucket per kind and
    /// device (DDP's semantics: sum, then divide by the world size).
    pub fn average(&self, grads: &[Tensor]) -> Result<(), DistError> {
        let size = self.world.size as f64;
        flat(grads, |buf| {
            self.check("allreduce", unsafe {
                kd_dist_allreduce_sum(self.raw, &raw(buf), 1)
            })?;
            tch::no_grad(|| {
                let _ = buf.shallow_clone().g_div_scalar_(size);
            });
            Ok(())
        })
    }
}

/// Runs the collective `f` once per kind of tensor in `ts`, on one flat
/// buffer holding all of them (c10d's list collectives are for one tensor
/// per device, not for a list of differently shaped tensors), then copies
/// the result back.
fn flat(
    ts: &[Tensor],
    mut f: impl FnMut(&Tensor) -> Result<(), DistError>,
) -> Result<(), DistError> {
    let mut kinds: Vec<(tch::Kind, tch::Device)> = Vec::new();
    for t in ts {
        if !kinds.contains(&(t.kind(), t.device())) {
            kinds.push((t.kind(), t.device()));
        }
    }
    for key in kinds {
        let group: Vec<&Tensor> = ts
            .iter()
            .filter(|t| (t.kind(), t.device()) == key)
            .collect();
        let buf = Tensor::cat(
            &group.iter().map(|t| t.reshape([-1])).collect::<Vec<_>>(),
            0,
        );
        f(&buf)?;
        let mut at = 0;
        tch::no_grad(|| {
            for t in group {
                let n = t.numel() as i64;
                t.shallow_clone().copy_(&buf.narrow(0, at, n).view_as(t));
                at += n;
            }
        });
    }
    Ok(())
}

static GROUP: std::sync::OnceLock<ProcessGroup> = std::sync::OnceLock::new();

/// Makes `pg` this process's group (PyTorch's default process group): the
/// engine reads it through [`group`]. Set once, by the binary, at start.
pub fn init(pg: ProcessGroup) -> Result<(), DistError> {
    GROUP
        .set(pg)
        .map_err(|_| DistError::Env("the process group is already set".into()))
}

/// This process's group, when it was launched as one rank of several.
pub fn group() -> Option<&'static ProcessGroup> {
    GROUP.get()
}

/// Processes in this job (1 outside a data-parallel launch).
pub fn world_size() -> usize {
    group().map_or(1, |g| g.world.size)
}

/// Whether this process writes the run's files: a single process, or rank 0.
pub fn is_main() -> bool {
    group().is_none_or(|g| g.world.is_main())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn no_world_size_is_a_single_process() {
        assert_eq!(World::from_vars(vars(&[])).unwrap(), None);
    }

    #[test]
    fn torchrun_variables_make_a_world() {
        let w = World::from_vars(vars(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((w.rank, w.size, w.local_rank), (3, 4, 1));
        assert!(w.agent_store && !w.is_main());
    }

    #[test]
    fn incomplete_variables_say_what_is_missing() {
        let e = World::from_vars(vars(&[("WORLD_SIZE", "2"), ("RANK", "0")])).unwrap_err();
        assert!(e.to_string().contains("MASTER_PORT"), "{e}");
        let e = World::from_vars(vars(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "2"),
            ("MASTER_PORT", "1"),
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("not below WORLD_SIZE"), "{e}");
    }

    /// Two ranks in two threads of this process, over Gloo on loopback.
    #[test]
    fn two_ranks_reduce_broadcast_and_gather() {
        let port = 29_000 + (std::process::id() % 1000) as u16;
        let ranks: Vec<_> = (0..2)
            .map(|rank| {
                std::thread::spawn(move || {
                    let world = World {
                        rank,
                        size: 2,
                        local_rank: rank,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                        agent_store: false,
                    };
                    let pg = ProcessGroup::new(world, false, Duration::from_secs(30)).unwrap();
                    let t = Tensor::from_slice(&[rank as f32 + 1.0, 10.0]);
                    pg.all_reduce_sum(std::slice::from_ref(&t)).unwrap();
                    let b = Tensor::from_slice(&[rank as f32]);
                    pg.broadcast(std::slice::from_ref(&b), 1).unwrap();
                    let g = pg.all_gather(&Tensor::from_slice(&[rank as i64])).unwrap();
                    let grads = [Tensor::from_slice(&[2.0f32 * rank as f32])];
                    pg.average(&grads).unwrap();
                    pg.barrier().unwrap();
                    (
                        Vec::<f32>::try_from(&t).unwrap(),
                        Vec::<f32>::try_from(&b).unwrap(),
                        g.iter()
                            .map(|x| Vec::<i64>::try_from(x).unwrap()[0])
                            .collect::<Vec<_>>(),
                        Vec::<f32>::try_from(&grads[0]).unwrap(),
                    )
                })
            })
            .collect();
        for r in ranks {
            let (t, b, g, avg) = r.join().unwrap();
            assert_eq!(t, vec![3.0, 20.0]);
            assert_eq!(b, vec![1.0]);
            assert_eq!(g, vec![0, 1]);
            assert_eq!(avg, vec![1.0]);
        }
    }
}
