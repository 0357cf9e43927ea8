//! The training-BatchNorm hook (`with_train_batch_norm`), through which the
//! engine runs SyncBatchNorm: every BatchNorm of every zoo network goes
//! through it in training forwards, none in eval ones, and only inside the
//! scope that installed it.

use std::cell::Cell;
use std::rc::Rc;

use kd_models::{
    BatchNormArgs, ModelError, TrainBatchNorm, build, is_transformer, names, with_train_batch_norm,
};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// libtorch's training BatchNorm, as the zoo runs it without a hook.
fn plain(a: &BatchNormArgs) -> Tensor {
    a.input.batch_norm(
        a.weight,
        a.bias,
        Some(a.running_mean),
        Some(a.running_var),
        true,
        a.momentum,
        a.eps,
        true,
    )
}

/// A hook that computes what the zoo would and counts its calls.
fn counting(calls: &Rc<Cell<usize>>) -> Rc<TrainBatchNorm> {
    let calls = calls.clone();
    Rc::new(move |a: &BatchNormArgs| {
        assert_eq!((a.momentum, a.eps), (0.1, 1e-5), "PyTorch's BatchNorm2d");
        calls.set(calls.get() + 1);
        Ok(plain(a))
    })
}

/// Every variable of `vs` (weights and running statistics), copied.
fn snapshot(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(k, t)| (k, t.copy()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn every_zoo_batch_norm_trains_through_the_hook() {
    tch::manual_seed(0);
    let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    // Transformers have no BatchNorm (and want 224-pixel inputs).
    for name in names().into_iter().filter(|n| !is_transformer(n)) {
        let vs = VarStore::new(Device::Cpu);
        let net = build(name, &vs.root(), 10).unwrap();
        let start = snapshot(&vs);
        let layers = start
            .iter()
            .filter(|(k, _)| k.ends_with("running_mean"))
            .count();
        let calls = Rc::new(Cell::new(0));
        let hooked = with_train_batch_norm(counting(&calls), || net.forward_taps(&x, true))
            .unwrap()
            .logits;
        assert_eq!(calls.get(), layers, "{name}: one call per BatchNorm");
        let hooked_state = snapshot(&vs);
        tch::no_grad(|| {
            for (k, v) in vs.variables() {
                let (_, s) = start.iter().find(|(n, _)| *n == k).unwrap();
                v.shallow_clone().copy_(s);
            }
        });
        let unhooked = net.forward_taps(&x, true).logits;
        assert_eq!(calls.get(), layers, "{name}: forward outside the scope");
        // A hook that computes what the zoo does changes nothing: the same
        // logits and running statistics, bit for bit.
        assert!(hooked.equal(&unhooked), "{name}: logits");
        for ((k, a), (_, b)) in hooked_state.iter().zip(&snapshot(&vs)) {
            assert!(a.equal(b), "{name}: {k}");
        }
    }
}

/// A hook that fails (a collective that timed out) fails the scope with its
/// first error; the forward finishes on batch statistics without calling
/// it again, and the enclosing scope's hook is back afterwards. Eval
/// forwards never call a hook.
#[test]
fn a_failing_hook_is_an_error_of_the_scope() {
    let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    let vs = VarStore::new(Device::Cpu);
    let net = build("resnet8", &vs.root(), 10).unwrap();
    let (outer, inner) = (Rc::new(Cell::new(0)), Rc::new(Cell::new(0)));
    let failing: Rc<TrainBatchNorm> = {
        let inner = inner.clone();
        Rc::new(move |a: &BatchNormArgs| {
            inner.set(inner.get() + 1);
            if inner.get() == 2 {
                return Err("peer gone".into());
            }
            Ok(plain(a))
        })
    };
    let res = with_train_batch_norm(counting(&outer), || {
        let err = with_train_batch_norm(failing, || net.forward_taps(&x, true)).unwrap_err();
        assert!(matches!(err, ModelError::TrainBatchNorm(_)), "{err:?}");
        assert_eq!(err.to_string(), "training BatchNorm: peer gone");
        net.forward_taps(&x, true)
    });
    assert!(res.is_ok());
    // Eval forwards do not call it.
    with_train_batch_norm(counting(&outer), || net.forward_taps(&x, false)).unwrap();
    assert_eq!(inner.get(), 2, "no call after the failure");
    let layers = vs
        .variables()
        .keys()
        .filter(|k| k.ends_with("running_mean"))
        .count();
    assert_eq!(
        outer.get(),
        layers,
        "the second forward, through the outer hook"
    );
}
