//! candle's backward with the vendored patch (vendor/candle-core/PATCHED.md: the first gradient a
//! tensor receives is stored as it is, later ones added), against hand-computed gradients: a
//! tensor with one consumer, with several (fan-in through different ops and through one op that
//! takes it twice), and a stored gradient that is shared by two tensors and then added to.

use candle_core::{Device, Tensor, Var};

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn first_gradients_are_stored_and_later_ones_added() {
    let dev = Device::Cpu;
    let x = Var::new(&[1.0f32, -2.0, 3.0], &dev).unwrap();
    let w = Var::new(&[0.5f32, 4.0, -1.5], &dev).unwrap();
    // loss = sum(x * w) + sum(3 x) + sum(x + x) + sum(w)
    //   dL/dx = w + 3 + 2,  dL/dw = x + 1
    let loss = ((x.as_tensor() * w.as_tensor()).unwrap().sum_all().unwrap()
        + (x.as_tensor() * 3.0).unwrap().sum_all().unwrap()
        + (x.as_tensor() + x.as_tensor()).unwrap().sum_all().unwrap()
        + w.as_tensor().sum_all().unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();
    assert_eq!(values(grads.get(&x).unwrap()), vec![5.5, 9.0, 3.5]);
    assert_eq!(values(grads.get(&w).unwrap()), vec![2.0, -1.0, 4.0]);
}

#[test]
fn a_gradient_shared_by_two_tensors_stays_theirs_when_one_is_added_to() {
    let dev = Device::Cpu;
    let a = Var::new(&[1.0f32, 2.0], &dev).unwrap();
    let b = Var::new(&[10.0f32, 20.0], &dev).unwrap();
    // s = a + b hands the same upstream gradient g = 2 s to a and to b (both first, so both
    // store it); a is then also used by a * 7, which adds 7 * 1 to a's gradient only.
    let s = (a.as_tensor() + b.as_tensor()).unwrap();
    let loss = (s.sqr().unwrap().sum_all().unwrap()
        + (a.as_tensor() * 7.0).unwrap().sum_all().unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();
    // dL/da = 2 (a + b) + 7, dL/db = 2 (a + b)
    assert_eq!(values(grads.get(&a).unwrap()), vec![29.0, 51.0]);
    assert_eq!(values(grads.get(&b).unwrap()), vec![22.0, 44.0]);
}
