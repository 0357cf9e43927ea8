//! `kd bench-data` (hidden): images per second of the ImageFolder training
//! pipeline alone (listing, decoding, RandomResizedCrop, flip, batching,
//! normalisation, optionally timm's RandAugment), what `scripts/bench-data`
//! sets beside torchvision's DataLoader on the same files.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use kd_data::{DataSource, Loader, LoaderConfig};
use tch::Device;

#[derive(Args, Debug)]
pub struct BenchDataArgs {
    /// An ImageFolder root (its train/ split is read).
    #[arg(long)]
    data: PathBuf,
    #[arg(long, default_value_t = 224)]
    image_size: u32,
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Decoding threads (rayon's pool; default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Epochs over the training split; the first batch of the first is
    /// not timed (the pipeline filling up).
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// timm's RandAugment after the crop and flip, as `kd distill --aa`
    /// takes it (e.g. `rand-m9-mstd0.5-inc1`).
    #[arg(long)]
    aa: Option<String>,
}

pub fn bench_data(a: &BenchDataArgs) -> Result<()> {
    if a.batch == 0 || a.epochs == 0 {
        bail!("--batch and --epochs must be at least 1");
    }
    if let Some(n) = a.workers {
        if n == 0 {
            bail!("--workers must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("starting the decoding threads")?;
    }
    let source = DataSource::ImageFolder {
        path: a.data.clone(),
        image_size: a.image_size,
        resize_size: a.image_size,
        skip_corrupt: false,
    };
    let splits = kd_data::load(&source, 0.0, 0)?;
    let cfg = LoaderConfig {
        batch_size: a.batch,
        shuffle: true,
        augment: true,
        padding: Default::default(),
        drop_last: false,
        contrast: None,
    };
    let mut loader = Loader::new(&splits.train, cfg, 0, Device::Cpu)?;
    if let Some(aa) = &a.aa {
        let ra = aa
            .parse::<kd_data::TimmRandAugment>()
            .map_err(|e| anyhow::anyhow!("--aa: {e}"))?;
        loader = loader.rand_augment(ra)?;
    }
    let (mut images, mut started) = (0i64, None);
    for epoch in 0..a.epochs {
        let order = loader.order(epoch);
        for b in 0..loader.batches_per_epoch() {
            let batch = loader.batch(&order, epoch, b)?;
            match started {
                None => started = Some((Instant::now(), cpu_seconds())),
                Some(_) => images += batch.images.size()[0],
            }
        }
    }
    let (secs, cpu) = started.map_or((0.0, None), |(t, c)| {
        let cpu = c.zip(cpu_seconds()).map(|(a, b)| b - a);
        (t.elapsed().as_secs_f64(), cpu)
    });
    let report = serde_json::json!({
        "images": images,
        "seconds": secs,
        "cpu_seconds": cpu,
        "images_per_sec": images as f64 / secs.max(1e-9),
        "workers": rayon::current_num_threads(),
        "threads": tch::get_num_threads(),
    });
    println!("{report}");
    Ok(())
}

/// CPU time (user + system) of this process, all threads, in seconds, from
/// `/proc/self/stat` (Linux; `None` elsewhere). Clock ticks are taken to be
/// 100 a second, Linux's `USER_HZ` on every architecture kd runs on.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which may hold spaces: state is
    // field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok();
    Some((ticks(11)? + ticks(12)?) / 100.0)
}
