//! SyncBatchNorm against libtorch's own BatchNorm in one process: two ranks
//! (torchrun, Gloo on loopback), each holding its share of a fixed batch,
//! give the output, gradients and running statistics that one
//! `batch_norm` over the whole batch gives. The reference is ATen's
//! `native_batch_norm`, an implementation independent of the shim's.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kd_dist::{BatchNormArgs, ProcessGroup, World};
use tch::{Device, Kind, Tensor};

const MOMENTUM: f64 = 0.1;
const EPS: f64 = 1e-5;
/// Rows of the whole batch, and where rank 1's share starts: unequal
/// shares, so that the counts matter.
const ROWS: i64 = 7;
const SPLIT: i64 = 4;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `a` equals `b` to 1e-5 of `b`'s largest magnitude.
fn assert_close(a: &Tensor, b: &Tensor, what: &str) {
    assert_eq!(a.size(), b.size(), "{what}: shapes");
    let diff = (a - b).abs().max().double_value(&[]);
    let scale = b.abs().max().double_value(&[]);
    assert!(
        diff <= 1e-5 * scale,
        "{what}: differs by {diff:e} (largest magnitude {scale:e})"
    );
}

/// A BatchNorm layer's parameters and buffers over `c` channels.
struct Layer {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
}

impl Layer {
    fn new(c: i64) -> Layer {
        Layer {
            weight: (Tensor::randn([c], (Kind::Float, Device::Cpu)) + 1.0).set_requires_grad(true),
            bias: Tensor::randn([c], (Kind::Float, Device::Cpu)).set_requires_grad(true),
            running_mean: Tensor::randn([c], (Kind::Float, Device::Cpu)) * 0.1,
            running_var: Tensor::rand([c], (Kind::Float, Device::Cpu)) + 0.5,
        }
    }

    fn copy(&self) -> Layer {
        let leaf = |t: &Tensor| t.detach().copy().set_requires_grad(true);
        Layer {
            weight: leaf(&self.weight),
            bias: leaf(&self.bias),
            running_mean: self.running_mean.copy(),
            running_var: self.running_var.copy(),
        }
    }

    fn input<'a>(&'a self, x: &'a Tensor) -> BatchNormArgs<'a> {
        BatchNormArgs {
            input: x,
            weight: Some(&self.weight),
            bias: Some(&self.bias),
            running_mean: &self.running_mean,
            running_var: &self.running_var,
            momentum: MOMENTUM,
            eps: EPS,
        }
    }

    /// libtorch's BatchNorm in training mode, as `tch::nn::BatchNorm` runs it.
    fn reference(&self, x: &Tensor) -> Tensor {
        x.batch_norm(
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            true,
            MOMENTUM,
            EPS,
            true,
        )
    }
}

/// One rank of [`two_ranks_equal_one_batch_norm_over_the_whole_batch`].
#[test]
#[ignore = "one rank of a two-rank job: started by two_ranks_equal_one_batch_norm_over_the_whole_batch"]
fn rank_of_the_sync_batch_norm_job() {
    let world = World::from_env()
        .unwrap()
        .expect("started by torchrun (WORLD_SIZE set)");
    assert_eq!(world.size, 2);
    let rank = world.rank as i64;
    let pg = ProcessGroup::new(world, false, Duration::from_secs(60)).unwrap();
    // The same batch on both ranks, its mean far from 0 (a sum of squares
    // minus the squared mean in fp32 would lose the variance).
    tch::manual_seed(11);
    let full = Tensor::randn([ROWS, 3, 4, 5], (Kind::Float, Device::Cpu)) * 2.0 + 30.0;
    let upstream = Tensor::randn([ROWS, 3, 4, 5], (Kind::Float, Device::Cpu));
    let layer = Layer::new(3);
    let (start, len) = if rank == 0 {
        (0, SPLIT)
    } else {
        (SPLIT, ROWS - SPLIT)
    };
    for channels_last in [false, true] {
        let layout = |t: &Tensor| {
            if channels_last {
                t.contiguous()
                    .permute([0, 2, 3, 1])
                    .contiguous()
                    .permute([0, 3, 1, 2])
            } else {
                t.shallow_clone()
            }
        };
        let what = |s: &str| format!("rank {rank}, channels_last {channels_last}: {s}");
        // One process over the whole batch. The job's loss is the sum of
        // the ranks' terms, each over its own rows, normalised by the
        // whole batch.
        let one = layer.copy();
        let x_one = layout(&full).detach().set_requires_grad(true);
        let y_one = one.reference(&x_one);
        (&y_one * &upstream)
            .sum(Kind::Float)
            .g_div_scalar(ROWS as f64)
            .backward();

        let mine = layer.copy();
        let x = layout(&full.narrow(0, start, len))
            .detach()
            .set_requires_grad(true);
        let y = pg.sync_batch_norm(mine.input(&x)).unwrap();
        (&y * upstream.narrow(0, start, len))
            .sum(Kind::Float)
            .g_div_scalar(ROWS as f64)
            .backward();

        assert_close(&y, &y_one.narrow(0, start, len), &what("output"));
        assert_close(
            &x.grad(),
            &x_one.grad().narrow(0, start, len),
            &what("input gradient"),
        );
        // The local weight and bias gradients, summed over the ranks (what
        // the engine's average does, times the world size).
        let (gw, gb) = (mine.weight.grad(), mine.bias.grad());
        pg.all_reduce_sum(&[gw.shallow_clone(), gb.shallow_clone()])
            .unwrap();
        assert_close(&gw, &one.weight.grad(), &what("weight gradient"));
        assert_close(&gb, &one.bias.grad(), &what("bias gradient"));
        assert_close(&mine.running_mean, &one.running_mean, &what("running mean"));
        assert_close(&mine.running_var, &one.running_var, &what("running var"));
        // Every rank holds the same running statistics, bit for bit.
        for t in [&mine.running_mean, &mine.running_var] {
            let all = pg.all_gather(t).unwrap();
            assert!(all[0].equal(&all[1]), "{}", what("ranks' running stats"));
        }
    }

    // A second derivative through the collective is refused, on every rank
    // alike, rather than computed wrong.
    let mine = layer.copy();
    let x = full.narrow(0, start, len).detach().set_requires_grad(true);
    let y = pg.sync_batch_norm(mine.input(&x)).unwrap();
    let err = Tensor::f_run_backward(&[y.square().sum(Kind::Float)], &[&x], true, true)
        .expect_err("create_graph through sync batchnorm fails");
    assert!(err.to_string().contains("second derivatives"), "{err}");
    pg.barrier().unwrap();
}

/// Runs [`rank_of_the_sync_batch_norm_job`] on two ranks under torchrun.
#[test]
fn two_ranks_equal_one_batch_norm_over_the_whole_batch() {
    let torchrun = std::env::var_os("VIRTUAL_ENV")
        .map(|v| Path::new(&v).join("bin/torchrun"))
        .filter(|p| p.exists())
        .expect("torchrun from the bootstrap venv (source scripts/env.sh)");
    let out = Command::new(torchrun)
        .args(["--nproc-per-node", "2", "--master-port"])
        .arg(free_port().to_string())
        .arg("--no-python")
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "rank_of_the_sync_batch_norm_job", "--ignored"])
        .args(["--test-threads", "1", "--nocapture"])
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // Both ranks ran the check (not filtered away).
    assert_eq!(stdout.matches("1 passed").count(), 2, "{stdout}");
}

/// In a world of one, sync batchnorm is libtorch's own, bit for bit.
#[test]
fn a_world_of_one_is_plain_batch_norm() {
    let world = World {
        rank: 0,
        size: 1,
        local_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: free_port(),
        agent_store: false,
    };
    let pg = ProcessGroup::new(world, false, Duration::from_secs(30)).unwrap();
    tch::manual_seed(5);
    let full = Tensor::randn([6, 4, 3, 3], (Kind::Float, Device::Cpu));
    let layer = Layer::new(4);
    let (a, b) = (layer.copy(), layer.copy());
    let (xa, xb) = (
        full.copy().set_requires_grad(true),
        full.copy().set_requires_grad(true),
    );
    let ya = a.reference(&xa);
    let yb = pg.sync_batch_norm(b.input(&xb)).unwrap();
    ya.square().sum(Kind::Float).backward();
    yb.square().sum(Kind::Float).backward();
    assert!(ya.equal(&yb));
    assert!(xa.grad().equal(&xb.grad()));
    assert!(a.weight.grad().equal(&b.weight.grad()));
    assert!(a.bias.grad().equal(&b.bias.grad()));
    assert!(a.running_mean.equal(&b.running_mean));
    assert!(a.running_var.equal(&b.running_var));
}
