//! Cost of averaging one step's gradients over the ranks: the gradients of
//! a zoo network (default resnet8x4, 100 classes), flattened, summed over
//! the ranks and copied back, as the engine does after each backward.
//! Launch with torchrun (`scripts/bench-allreduce`):
//!
//!     torchrun --nproc-per-node 2 --no-python target/release/examples/allreduce [arch] [iters]

use std::time::{Duration, Instant};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let arch = args.next().unwrap_or_else(|| "resnet8x4".into());
    let iters: usize = args.next().map_or(Ok(50), |s| s.parse())?;
    let world = kd_dist::World::from_env()?.ok_or("launch with torchrun (WORLD_SIZE unset)")?;
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    kd_models::build(&arch, &vs.root(), 100)?;
    let grads: Vec<tch::Tensor> = vs
        .trainable_variables()
        .iter()
        .map(|p| p.randn_like())
        .collect();
    let numel: i64 = grads.iter().map(|g| g.numel() as i64).sum();
    let rank = world.rank;
    let pg = kd_dist::ProcessGroup::new(world, false, Duration::from_secs(60))?;
    pg.average(&grads)?; // warm-up: connections, buffers
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        pg.barrier()?;
        let t = Instant::now();
        pg.average(&grads)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    if rank == 0 {
        println!(
            "{arch}: {} gradient tensors, {numel} floats ({:.1} MB), {} ranks: median {:.2} ms per average (min {:.2}, max {:.2}) over {iters}",
            grads.len(),
            numel as f64 * 4.0 / 1e6,
            pg.world.size,
            times[times.len() / 2],
            times[0],
            times[times.len() - 1]
        );
    }
    Ok(())
}
