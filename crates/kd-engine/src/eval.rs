use kd_data::Dataset;
use kd_models::Network;
use tch::{Device, Kind, Tensor};

/// Top-1 and top-5 accuracy in percent (top-5 NaN for fewer than 6
/// classes, where every prediction is in the top 5), in eval mode, in
/// libtorch's inference mode (nothing of it is ever differentiated), with the hit
/// counts summed on the device and read once at the end. In a
/// data-parallel job each rank evaluates its contiguous share of `data`
/// and the counts are summed over the ranks.
pub fn accuracy(
    net: &dyn Network,
    data: &Dataset,
    batch_size: usize,
    device: Device,
) -> crate::Result<(f64, f64)> {
    let n = data.len();
    if n == 0 {
        return Ok((0.0, 0.0));
    }
    let (lo, hi) = match kd_dist::group() {
        Some(g) => {
            let (r, w) = (g.world.rank as i64, g.world.size as i64);
            (n * r / w, n * (r + 1) / w)
        }
        None => (0, n),
    };
    let hits = kd_aten::inference_mode(|| -> crate::Result<Tensor> {
        // Top-1 hits, top-5 hits, samples seen: image files left out as
        // unreadable are not counted.
        let mut hits = Tensor::zeros([2], (Kind::Int64, device));
        let mut seen = 0i64;
        for batch in data.eval_batches(lo, hi, batch_size, device) {
            let (x, y) = batch?;
            let logits = net.forward_taps(&x, false).logits;
            let k = logits.size()[1].min(5);
            let (_, pred) = logits.topk(k, 1, true, true);
            let hit = pred.eq_tensor(&y.unsqueeze(1));
            let batch = Tensor::stack(
                &[hit.narrow(1, 0, 1).sum(Kind::Int64), hit.sum(Kind::Int64)],
                0,
            );
            hits += batch;
            seen += y.size()[0];
        }
        let seen = Tensor::from_slice(&[seen]).to_device(device);
        Ok(Tensor::cat(&[hits, seen], 0))
    })?;
    if let Some(g) = kd_dist::group() {
        // A clone: inference-mode tensors refuse in-place updates outside it.
        let hits = hits.copy();
        g.all_reduce_sum(std::slice::from_ref(&hits))?;
        return Ok(percent(&hits, data.num_classes));
    }
    Ok(percent(&hits, data.num_classes))
}

fn percent(hits: &Tensor, classes: i64) -> (f64, f64) {
    let (top1, top5, n) = (
        hits.int64_value(&[0]),
        hits.int64_value(&[1]),
        hits.int64_value(&[2]),
    );
    if n == 0 {
        return (0.0, 0.0);
    }
    let top5 = if classes < 6 {
        f64::NAN
    } else {
        100.0 * top5 as f64 / n as f64
    };
    (100.0 * top1 as f64 / n as f64, top5)
}
