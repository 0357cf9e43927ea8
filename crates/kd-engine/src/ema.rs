//! An exponential moving average of a network's weights, as timm's
//! `ModelEmaV3` (`timm/utils/model_ema.py`), updated after each optimiser
//! update with `step` = the number of updates so far.

use tch::{Kind, Tensor};

use crate::Result;
use crate::plan::EmaPlan;

fn is_float(t: &Tensor) -> bool {
    matches!(
        t.kind(),
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    )
}

/// `ModelEmaV3.update(model, step)` on tensors given in the same order
/// (the EMA's and the network's state, parameters and buffers):
/// floating-point entries lerped towards the network's with weight
/// `1 - decay_at(step)` in one foreach call, the others copied; with
/// `exclude_buffers` only parameters (`is_param`) are lerped and every
/// buffer copied.
pub fn ema_update(
    plan: &EmaPlan,
    step: u64,
    ema: &[Tensor],
    model: &[Tensor],
    is_param: &[bool],
) -> Result<()> {
    let weight = 1.0 - plan.decay_at(step);
    let (mut lerp_e, mut lerp_m) = (Vec::new(), Vec::new());
    tch::no_grad(|| -> Result<()> {
        for ((e, m), &param) in ema.iter().zip(model).zip(is_param) {
            let lerp = if plan.exclude_buffers {
                param
            } else {
                is_float(e)
            };
            if lerp {
                lerp_e.push(e.shallow_clone());
                lerp_m.push(m.shallow_clone());
            } else {
                e.shallow_clone().f_copy_(m)?;
            }
        }
        Ok(())
    })?;
    kd_aten::foreach_lerp_(&lerp_e, &lerp_m, weight)?;
    Ok(())
}
