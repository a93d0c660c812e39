//! The mHC custom ops on the CPU against the f64 reference (spec/mhc.md, "Numerics and tests"):
//! forward outputs and every gradient (x, phi, alpha, b, y) of the scalar loss
//! sum(W1 * post) + sum(W2 * pre), relative error ||out - ref|| / ||ref|| below 1e-5 for f32 storage
//! and 1e-2 for bf16 storage, over n, C, T, logit scale, static and dynamic mode. The CPU kernels
//! fill every output buffer with NaN before writing it, so a finite output proves every element
//! was written; NaN never passes a bound. Also: H's properties, error paths, and `mhc_apply`.

use candle_core::{DType, Device, Tensor, Var};
use mhc_train::config::MhcImpl;
use mhc_train::gpu::cases::{Case, MhcInputs};
use mhc_train::mhc::apply::{mhc_apply, rms_norm};
use mhc_train::mhc::{ops, reference, MhcShape};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use std::collections::HashMap;

type Res<T> = anyhow::Result<T>;

const TOL_F32: f64 = 1e-5;
const TOL_BF16: f64 = 1e-2;

fn normal(rng: &mut ChaCha8Rng, len: usize, std: f64) -> Vec<f32> {
    let dist = Normal::new(0.0, std).unwrap();
    (0..len).map(|_| dist.sample(rng) as f32).collect()
}

/// ||a - b|| / ||b|| in f64; NaN if either holds a NaN (and NaN fails every `<` bound).
fn rel_err(a: &Tensor, b: &Tensor) -> Res<f64> {
    let a = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    assert_eq!(a.len(), b.len());
    let diff: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
    let norm: f64 = b.iter().map(|y| y * y).sum();
    Ok((diff / norm).sqrt())
}

fn assert_finite(name: &str, t: &Tensor) -> Res<()> {
    let v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        panic!(
            "{name}: element {i} of {} is {} (unwritten or overflowed)",
            v.len(),
            v[i]
        );
    }
    Ok(())
}

/// One case's inputs as tensors: storage-dtype x and y; f32 parameters; loss weights in f32,
/// exactly representable in the storage dtype. Drawn by the GPU selftests' sampler.
struct Inputs {
    shape: MhcShape,
    x: Tensor,
    y: Tensor,
    phi: Option<Tensor>,
    alpha: Tensor,
    b: Tensor,
    /// Loss weights of post [T, n, C] and pre [T, C].
    w_post: Tensor,
    w_pre: Tensor,
}

fn inputs(case: Case, seed: u64) -> Res<Inputs> {
    let host = MhcInputs::new(&case, seed)?;
    let shape = host.shape;
    let (t, n, c, k) = (host.tokens, shape.streams, shape.width, shape.k());
    let tensor = |v: Vec<f32>, dims: &[usize]| Tensor::from_vec(v, dims, &Device::Cpu);
    Ok(Inputs {
        shape,
        x: tensor(host.x, &[t, n, c])?.to_dtype(case.dtype)?,
        y: tensor(host.y, &[t, c])?.to_dtype(case.dtype)?,
        phi: host.phi.map(|p| tensor(p, &[n * c, k])).transpose()?,
        alpha: tensor(host.alpha, &[3])?,
        b: tensor(host.b, &[k])?,
        w_post: tensor(host.w_post, &[t, n, c])?,
        w_pre: tensor(host.w_pre, &[t, c])?,
    })
}

/// Forward outputs (h, u, x') and gradients (x, phi, alpha, b, y) of sum(W1 * x') + sum(W2 * u).
struct Results {
    h: Tensor,
    u: Tensor,
    x_out: Tensor,
    dx: Tensor,
    dphi: Option<Tensor>,
    dalpha: Option<Tensor>,
    db: Tensor,
    dy: Tensor,
}

/// Runs the three functions of one implementation, with every input cast to `dtype` (the
/// storage dtype for x and y; the parameters stay f32 unless `dtype` is F64).
fn run(
    inp: &Inputs,
    f64_copies: bool,
    coeffs: impl Fn(
        &Tensor,
        Option<&Tensor>,
        &Tensor,
        &Tensor,
        &MhcShape,
    ) -> candle_core::Result<Tensor>,
    pre: impl Fn(&Tensor, &Tensor, &MhcShape) -> candle_core::Result<Tensor>,
    post: impl Fn(&Tensor, &Tensor, &Tensor, &MhcShape) -> candle_core::Result<Tensor>,
) -> Res<Results> {
    let cast = |t: &Tensor| -> Res<Var> {
        Ok(Var::from_tensor(&if f64_copies {
            t.to_dtype(DType::F64)?
        } else {
            t.clone()
        })?)
    };
    let x = cast(&inp.x)?;
    let y = cast(&inp.y)?;
    let phi = inp.phi.as_ref().map(&cast).transpose()?;
    let alpha = cast(&inp.alpha)?;
    let b = cast(&inp.b)?;
    let shape = &inp.shape;
    let h = coeffs(&x, phi.as_deref(), &alpha, &b, shape)?;
    let u = pre(&x, &h, shape)?;
    let x_out = post(&x, &h, &y, shape)?;
    let loss_dtype = if f64_copies { DType::F64 } else { DType::F32 };
    let w_post = inp.w_post.to_dtype(loss_dtype)?;
    let w_pre = inp.w_pre.to_dtype(loss_dtype)?;
    let loss = ((x_out.to_dtype(loss_dtype)? * w_post)?.sum_all()?
        + (u.to_dtype(loss_dtype)? * w_pre)?.sum_all()?)?;
    let grads = loss.backward()?;
    let grad = |v: &Var| grads.get(v).cloned();
    Ok(Results {
        dx: grad(&x).expect("x has a gradient"),
        dphi: phi.as_ref().and_then(grad),
        dalpha: grad(&alpha),
        db: grad(&b).expect("b has a gradient"),
        dy: grad(&y).expect("y has a gradient"),
        h,
        u,
        x_out,
    })
}

/// Worst relative error per quantity over a set of cases.
#[derive(Default)]
struct Worst(Vec<(&'static str, f64, String)>);

impl Worst {
    fn record(&mut self, name: &'static str, err: f64, case: &Case, tol: f64) {
        assert!(
            err < tol,
            "{name}: relative error {err:e} >= {tol:e} in {case:?}"
        );
        match self.0.iter_mut().find(|(n, _, _)| *n == name) {
            Some(entry) if entry.1 < err => *entry = (name, err, format!("{case:?}")),
            Some(_) => {}
            None => self.0.push((name, err, format!("{case:?}"))),
        }
    }
}

fn check_case(case: Case, seed: u64, worst: &mut Worst) -> Res<()> {
    let tol = if case.dtype == DType::F32 {
        TOL_F32
    } else {
        TOL_BF16
    };
    let inp = inputs(case, seed)?;
    let got = run(&inp, false, ops::coeffs, ops::pre, ops::post)?;
    let want = run(
        &inp,
        true,
        reference::coeffs,
        reference::pre,
        reference::post,
    )?;
    let pairs = [
        ("h", &got.h, &want.h),
        ("u", &got.u, &want.u),
        ("x_out", &got.x_out, &want.x_out),
        ("dx", &got.dx, &want.dx),
        ("db", &got.db, &want.db),
        ("dy", &got.dy, &want.dy),
    ];
    for (name, g, w) in pairs {
        assert_finite(name, g)?;
        assert_eq!(g.dims(), w.dims(), "{name} in {case:?}");
        worst.record(name, rel_err(g, w)?, &case, tol);
    }
    assert_eq!(got.x_out.dtype(), case.dtype);
    assert_eq!(got.dx.dtype(), case.dtype);
    assert_eq!(got.dy.dtype(), case.dtype);
    let dalpha = got.dalpha.expect("ops give alpha a gradient");
    assert_finite("dalpha", &dalpha)?;
    if case.dynamic {
        let dphi = got.dphi.expect("dynamic ops give phi a gradient");
        assert_finite("dphi", &dphi)?;
        worst.record(
            "dphi",
            rel_err(&dphi, &want.dphi.expect("reference dphi"))?,
            &case,
            tol,
        );
        worst.record(
            "dalpha",
            rel_err(&dalpha, &want.dalpha.expect("reference dalpha"))?,
            &case,
            tol,
        );
    } else {
        assert!(got.dphi.is_none());
        // Static mode: P = 0, so alpha does not act and its gradient is exactly zero.
        assert_eq!(dalpha.to_vec1::<f32>()?, vec![0.0; 3], "{case:?}");
    }
    Ok(())
}

fn check_matrix(dtype: DType) -> Res<()> {
    let mut worst = Worst::default();
    let mut seed = 0;
    for streams in [2, 4, 8] {
        for width in [7, 33] {
            for tokens in [1, 5, 64] {
                for scale in [0.01, 1.0, 3.0] {
                    for dynamic in [false, true] {
                        seed += 1;
                        check_case(
                            Case {
                                streams,
                                width,
                                tokens,
                                scale,
                                dynamic,
                                dtype,
                            },
                            seed,
                            &mut worst,
                        )?;
                    }
                }
            }
        }
    }
    for (name, err, case) in &worst.0 {
        println!("{dtype:?} worst {name}: {err:.3e} at {case}");
    }
    Ok(())
}

#[test]
fn ops_match_reference_f32() -> Res<()> {
    check_matrix(DType::F32)
}

#[test]
fn ops_match_reference_bf16() -> Res<()> {
    check_matrix(DType::BF16)
}

/// spec/mhc.md properties at init-like parameters: rows of H_res sum to 1 within 1e-5, columns
/// within 1e-3 after 20 iterations, H_pre in (0, 1), H_post in (0, 2).
#[test]
fn h_has_the_spec_properties() -> Res<()> {
    let dev = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let shape = MhcShape {
        streams: 4,
        width: 64,
        sinkhorn_iters: 20,
        dynamic: true,
    };
    let (t, n, c, k) = (32, shape.streams, shape.width, shape.k());
    let x = Tensor::from_vec(normal(&mut rng, t * n * c, 1.0), (t, n, c), &dev)?;
    let phi = Tensor::from_vec(normal(&mut rng, n * c * k, 0.02), (n * c, k), &dev)?;
    let alpha = Tensor::new(&[0.01f32; 3], &dev)?;
    let mut b = vec![0f32; k];
    b[..n].fill(-((n - 1) as f32).ln());
    let b = Tensor::from_vec(b, k, &dev)?;
    let h = ops::coeffs(&x, Some(&phi), &alpha, &b, &shape)?.to_vec2::<f32>()?;
    for row in &h {
        assert!(
            row[..n].iter().all(|&v| v > 0.0 && v < 1.0),
            "H_pre {row:?}"
        );
        assert!(
            row[n..2 * n].iter().all(|&v| v > 0.0 && v < 2.0),
            "H_post {row:?}"
        );
        // H_pre = 1/n and H_post = 1 at these parameters, up to alpha * P / r.
        assert!(
            row[..n].iter().all(|&v| (v - 0.25).abs() < 0.01),
            "H_pre {row:?}"
        );
        let res = &row[2 * n..];
        for i in 0..n {
            let row_sum: f32 = res[i * n..(i + 1) * n].iter().sum();
            let col_sum: f32 = (0..n).map(|r| res[r * n + i]).sum();
            assert!((row_sum - 1.0).abs() < 1e-5, "row {i} sums to {row_sum}");
            assert!((col_sum - 1.0).abs() < 1e-3, "column {i} sums to {col_sum}");
        }
    }
    Ok(())
}

#[test]
fn ops_reject_bad_inputs() -> Res<()> {
    let dev = Device::Cpu;
    let shape = MhcShape {
        streams: 2,
        width: 3,
        sinkhorn_iters: 5,
        dynamic: true,
    };
    let k = shape.k();
    let x = Tensor::ones((4, 2, 3), DType::F32, &dev)?;
    let phi = Tensor::zeros((6, k), DType::F32, &dev)?;
    let alpha_b = Tensor::zeros(3 + k, DType::F32, &dev)?;
    // The raw op requires contiguous inputs (the public functions make them so).
    let x_strided = Tensor::ones((4, 3, 2), DType::F32, &dev)?.transpose(1, 2)?;
    let op = ops::CoeffsOp { shape };
    let err = x_strided
        .apply_op3_no_bwd(&phi, &alpha_b, &op)
        .unwrap_err()
        .to_string();
    assert!(err.contains("x must be contiguous"), "{err}");
    // ... and it works on the same values made contiguous.
    let ext = x_strided
        .contiguous()?
        .apply_op3_no_bwd(&phi, &alpha_b, &op)?;
    assert_eq!(ext.dims(), [4, 2 * k + 1]);
    // Through the public function, a strided x gives the same H as a contiguous one.
    let alpha = Tensor::new(&[0.5f32, 1.0, 2.0], &dev)?;
    let b = Tensor::from_vec((0..k).map(|i| i as f32 * 0.1).collect::<Vec<_>>(), k, &dev)?;
    let phi_r = Tensor::from_vec(
        (0..6 * k)
            .map(|i| (i as f32 * 0.37).sin())
            .collect::<Vec<_>>(),
        (6, k),
        &dev,
    )?;
    let x_r = Tensor::from_vec(
        (0..24).map(|i| (i as f32 * 0.71).cos()).collect::<Vec<_>>(),
        (4, 3, 2),
        &dev,
    )?;
    let h_strided = ops::coeffs(&x_r.transpose(1, 2)?, Some(&phi_r), &alpha, &b, &shape)?;
    let h_contig = ops::coeffs(
        &x_r.transpose(1, 2)?.contiguous()?,
        Some(&phi_r),
        &alpha,
        &b,
        &shape,
    )?;
    assert_eq!(h_strided.to_vec2::<f32>()?, h_contig.to_vec2::<f32>()?);
    // Shapes and modes.
    let err = ops::coeffs(&x, None, &alpha, &b, &shape)
        .unwrap_err()
        .to_string();
    assert!(err.contains("phi is missing"), "{err}");
    let bad_phi = Tensor::zeros((5, k), DType::F32, &dev)?;
    let err = ops::coeffs(&x, Some(&bad_phi), &alpha, &b, &shape)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("phi has shape [5, 8], expected [6, 8]"),
        "{err}"
    );
    let h = Tensor::zeros((4, k), DType::F32, &dev)?;
    let bad_y = Tensor::zeros((4, 2), DType::F32, &dev)?;
    let err = ops::post(&x, &h, &bad_y, &shape).unwrap_err().to_string();
    assert!(err.contains("y has shape [4, 2], expected [4, 3]"), "{err}");
    let y_f64 = Tensor::zeros((4, 3), DType::F64, &dev)?;
    let err = ops::post(&x, &h, &y_f64, &shape).unwrap_err().to_string();
    assert!(err.contains("y has dtype F64, expected F32"), "{err}");
    Ok(())
}

/// Input file for `mhc_apply`: x, phi (dynamic), alpha, b, gamma, dout, sinkhorn_iters.
fn apply_inputs(dynamic: bool, dtype: DType) -> Res<HashMap<String, Tensor>> {
    let dev = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    let (t, n, c) = (6, 4, 9);
    let k = n * n + 2 * n;
    let mut m = HashMap::new();
    m.insert(
        "x".into(),
        Tensor::from_vec(normal(&mut rng, t * n * c, 1.0), (t, n, c), &dev)?.to_dtype(dtype)?,
    );
    if dynamic {
        m.insert(
            "phi".into(),
            Tensor::from_vec(normal(&mut rng, n * c * k, 0.2), (n * c, k), &dev)?,
        );
        m.insert("alpha".into(), Tensor::new(&[0.7f32, 1.1, 1.9], &dev)?);
    }
    m.insert(
        "b".into(),
        Tensor::from_vec(normal(&mut rng, k, 1.0), k, &dev)?,
    );
    m.insert(
        "gamma".into(),
        Tensor::from_vec(normal(&mut rng, c, 1.0), c, &dev)?,
    );
    m.insert(
        "dout".into(),
        Tensor::from_vec(normal(&mut rng, t * n * c, 1.0), (t, n, c), &dev)?,
    );
    m.insert("sinkhorn_iters".into(), Tensor::new(12i64, &dev)?);
    Ok(m)
}

/// The tensors `mhc_apply` writes given dout: dphi only in dynamic mode (dalpha always).
fn apply_output_names(dynamic: bool) -> Vec<&'static str> {
    let mut names = vec!["x_out", "h", "dx", "dalpha", "db", "dgamma"];
    if dynamic {
        names.push("dphi");
    }
    names
}

/// The same sublayer and loss as `mhc_apply`, written here in f64 on the reference ops.
fn apply_oracle(inp: &HashMap<String, Tensor>) -> Res<HashMap<String, Tensor>> {
    let f64v = |name: &str| -> Res<Var> { Ok(Var::from_tensor(&inp[name].to_dtype(DType::F64)?)?) };
    let x = f64v("x")?;
    let (_, n, c) = x.dims3()?;
    let phi = inp.contains_key("phi").then(|| f64v("phi")).transpose()?;
    let alpha = if phi.is_some() {
        f64v("alpha")?
    } else {
        Var::zeros(3, DType::F64, &Device::Cpu)?
    };
    let (b, gamma) = (f64v("b")?, f64v("gamma")?);
    let shape = MhcShape {
        streams: n,
        width: c,
        sinkhorn_iters: 12,
        dynamic: phi.is_some(),
    };
    let h = reference::coeffs(&x, phi.as_deref(), &alpha, &b, &shape)?;
    let u = reference::pre(&x, &h, &shape)?;
    let rms = (u.sqr()?.mean_keepdim(1)? + 1e-6)?.sqrt()?;
    let y = u.broadcast_div(&rms)?.broadcast_mul(&gamma)?;
    let x_out = reference::post(&x, &h, &y, &shape)?;
    let grads = (&x_out * inp["dout"].to_dtype(DType::F64)?)?
        .sum_all()?
        .backward()?;
    let mut out = HashMap::from([("x_out".to_string(), x_out), ("h".to_string(), h)]);
    for (name, var) in [("dx", &x), ("db", &b), ("dgamma", &gamma)] {
        out.insert(name.into(), grads.get(var).unwrap().clone());
    }
    if let Some(phi) = &phi {
        out.insert("dphi".into(), grads.get(phi).unwrap().clone());
        out.insert("dalpha".into(), grads.get(&alpha).unwrap().clone());
    }
    Ok(out)
}

#[test]
fn apply_round_trips_with_both_impls() -> Res<()> {
    let dir = tempfile::tempdir()?;
    for (dynamic, dtype, tol) in [
        (true, DType::F32, TOL_F32),
        (false, DType::F32, TOL_F32),
        (true, DType::BF16, TOL_BF16),
    ] {
        let inp = apply_inputs(dynamic, dtype)?;
        let input = dir.path().join("in.safetensors");
        candle_core::safetensors::save(&inp, &input)?;
        let oracle = apply_oracle(&inp)?;
        let mut outs = Vec::new();
        for imp in [MhcImpl::Fused, MhcImpl::Reference] {
            let output = dir.path().join(format!("out-{imp:?}.safetensors"));
            mhc_apply(&input, &output, imp, &Device::Cpu)?;
            outs.push(candle_core::safetensors::load(&output, &Device::Cpu)?);
        }
        let names = apply_output_names(dynamic);
        for out in &outs {
            let mut keys: Vec<&String> = out.keys().collect();
            keys.sort();
            let mut want: Vec<&str> = names.clone();
            want.sort();
            assert_eq!(keys, want);
            assert_eq!(out["x_out"].dtype(), dtype);
            assert_eq!(out["dx"].dtype(), dtype);
        }
        for name in &names {
            let (fused, refr) = (&outs[0][*name], &outs[1][*name]);
            assert_finite(name, fused)?;
            match oracle.get(*name) {
                Some(want) => {
                    let (e_fused, e_ref) = (rel_err(fused, want)?, rel_err(refr, want)?);
                    let e_pair = rel_err(fused, refr)?;
                    assert!(
                        e_fused < tol && e_ref < tol && e_pair < tol,
                        "{name} (dynamic {dynamic}, {dtype:?}): vs f64 oracle fused {e_fused:e}, \
                         reference {e_ref:e}; fused vs reference {e_pair:e}"
                    );
                }
                // dalpha in static mode: alpha does not act.
                None => assert_eq!(fused.to_vec1::<f32>()?, vec![0.0; 3]),
            }
        }
    }
    Ok(())
}

#[test]
fn apply_names_missing_and_misshapen_tensors() -> Res<()> {
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("in.safetensors");
    let output = dir.path().join("out.safetensors");
    let err_with = |edit: &dyn Fn(&mut HashMap<String, Tensor>)| -> Res<String> {
        let mut inp = apply_inputs(true, DType::F32)?;
        edit(&mut inp);
        candle_core::safetensors::save(&inp, &input)?;
        Ok(format!(
            "{:#}",
            mhc_apply(&input, &output, MhcImpl::Fused, &Device::Cpu).unwrap_err()
        ))
    };
    let err = err_with(&|m| {
        m.remove("gamma");
    })?;
    assert!(err.contains("no tensor \"gamma\""), "{err}");
    let err = err_with(&|m| {
        m.remove("alpha");
    })?;
    assert!(err.contains("no tensor \"alpha\""), "{err}");
    let err = err_with(&|m| {
        m.insert(
            "phi".into(),
            Tensor::zeros((36, 23), DType::F32, &Device::Cpu).unwrap(),
        );
    })?;
    assert!(
        err.contains("\"phi\" has shape [36, 23], expected [36, 24]"),
        "{err}"
    );
    let err = err_with(&|m| {
        m.insert(
            "dout".into(),
            Tensor::zeros((6, 4, 8), DType::F32, &Device::Cpu).unwrap(),
        );
    })?;
    assert!(
        err.contains("\"dout\" has shape [6, 4, 8], expected [6, 4, 9]"),
        "{err}"
    );
    let err = err_with(&|m| {
        m.insert(
            "Gamma".into(),
            Tensor::zeros(9, DType::F32, &Device::Cpu).unwrap(),
        );
    })?;
    assert!(err.contains("unknown tensor \"Gamma\""), "{err}");
    let err = err_with(&|m| {
        m.insert(
            "sinkhorn_iters".into(),
            Tensor::new(0i64, &Device::Cpu).unwrap(),
        );
    })?;
    assert!(err.contains("\"sinkhorn_iters\" is 0"), "{err}");
    assert!(
        !output.exists(),
        "no output is written when the input is bad"
    );
    // The RMSNorm helper on a hand-computed case: u = (3, 4), mean(u^2) = 12.5.
    let u = Tensor::new(&[[3.0f32, 4.0]], &Device::Cpu)?;
    let gamma = Tensor::new(&[1.0f32, 2.0], &Device::Cpu)?;
    let y = rms_norm(&u, &gamma)?.to_vec2::<f32>()?;
    let r = (12.5f32 + 1e-6).sqrt();
    assert!(
        (y[0][0] - 3.0 / r).abs() < 1e-6 && (y[0][1] - 8.0 / r).abs() < 1e-6,
        "{y:?}"
    );
    Ok(())
}

/// `mhc-apply --device hip`: the HIP launch layer's sublayer as the HIP bench runs it (F = the
/// fused RMSNorm, dx written once by the chained backward) against the same f64 oracle. Needs an
/// AMD GPU or the emulated one that CI builds (scripts/build-hip-emulator.sh):
/// `LD_LIBRARY_PATH=.bin/hip-emulator cargo test --release --features hip --test mhc_ops -- --ignored`
#[cfg(feature = "hip")]
#[test]
#[ignore = "needs an AMD GPU, or LD_LIBRARY_PATH=.bin/hip-emulator"]
fn apply_on_hip_matches_the_oracle() -> Res<()> {
    let dir = tempfile::tempdir()?;
    for (dynamic, dtype, tol) in [
        (true, DType::F32, TOL_F32),
        (false, DType::F32, TOL_F32),
        (true, DType::BF16, TOL_BF16),
        (false, DType::BF16, TOL_BF16),
    ] {
        let inp = apply_inputs(dynamic, dtype)?;
        let input = dir.path().join("in.safetensors");
        let output = dir.path().join("out.safetensors");
        candle_core::safetensors::save(&inp, &input)?;
        let run = std::process::Command::new(env!("CARGO_BIN_EXE_mhc-train"))
            .arg("mhc-apply")
            .args(["--device", "hip", "--in"])
            .arg(&input)
            .arg("--out")
            .arg(&output)
            .output()?;
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let out = candle_core::safetensors::load(&output, &Device::Cpu)?;
        let oracle = apply_oracle(&inp)?;
        for name in apply_output_names(dynamic) {
            let got = out
                .get(name)
                .unwrap_or_else(|| panic!("no {name} in the output"));
            assert_finite(name, got)?;
            match oracle.get(name) {
                Some(want) => {
                    let err = rel_err(got, want)?;
                    assert!(
                        err < tol,
                        "{name} (dynamic {dynamic}, {dtype:?}): {err:e} against the f64 oracle"
                    );
                }
                // dalpha in static mode: alpha does not act.
                None => assert_eq!(got.to_vec1::<f32>()?, vec![0.0; 3]),
            }
        }
    }
    Ok(())
}
