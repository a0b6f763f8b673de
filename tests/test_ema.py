"""EMA op, update_momentum and MomentumTeacher against the float64 reference."""
import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ssl_fast
from ssl_fast import ops
from ssl_fast.nn import MomentumTeacher, cosine_momentum, update_momentum
from helpers import assert_matches_reference, backend_params

FLOATS = [torch.float32, torch.bfloat16, torch.float16]


def _truth(e, t, m):
    """float64 truth of m*e + (1-m)*t, before rounding to e's dtype."""
    return m * e.double() + (1 - m) * t.double()


def _eager_same_dtype(e, t, m):
    """The official per-parameter loop, in e's dtype: the low-precision baseline."""
    out = e.clone()
    out.mul_(m).add_((1 - m) * t.to(e.dtype))
    return out


pair_shapes = st.lists(
    st.sampled_from([(1,), (7,), (5, 3), (197, 3), (64, 65), (3, 7, 2), (70000,)]), min_size=1, max_size=4)


@pytest.mark.parametrize("backend", backend_params("ema"))
@given(shapes=pair_shapes,
       e_dtype=st.sampled_from(FLOATS), s_dtype=st.sampled_from(FLOATS),
       momentum=st.one_of(st.sampled_from([0.0, 1.0, 0.996]), st.floats(0.0, 1.0)),
       as_tensor=st.booleans(), transposed=st.booleans(), seed=st.integers(0, 2**16))
def test_ema_matches_reference(backend, shapes, e_dtype, s_dtype, momentum, as_tensor, transposed, seed):
    g = torch.Generator().manual_seed(seed)
    ema = [torch.randn(s, generator=g).to(e_dtype) for s in shapes]
    src = [torch.randn(s, generator=g).to(s_dtype) for s in shapes]
    if transposed:  # non-contiguous teacher and student tensors
        ema = [e.t().contiguous().t() if e.dim() == 2 else e for e in ema]
        src = [s.t().contiguous().t() if s.dim() == 2 else s for s in src]
    before = [e.clone() for e in ema]
    m = torch.tensor(momentum, dtype=torch.float64) if as_tensor else momentum
    ops.ema_(ema, src, m, backend=backend)
    for e, b, s in zip(ema, before, src):
        m_f = float(m)
        truth = _truth(b, s, m_f)
        assert_matches_reference(e, truth, _eager_same_dtype(b, s, m_f), what=f"ema ({e_dtype}<-{s_dtype})")
        if momentum == 1.0:
            assert torch.equal(e, b), "momentum 1 must leave the teacher unchanged"
        if momentum == 0.0:
            assert torch.equal(e, s.to(e_dtype)), "momentum 0 must copy the student"


@pytest.mark.parametrize("backend", backend_params("ema"))
def test_ema_integer_tensors_are_copied_and_float64_kept_exact(backend):
    ema = [torch.zeros(3, dtype=torch.int64), torch.randn(9, dtype=torch.float64)]
    src = [torch.tensor([4, 5, 6]), torch.randn(9, dtype=torch.float64)]
    truth = 0.25 * ema[1] + 0.75 * src[1]
    ops.ema_(ema, src, 0.25, backend=backend)
    assert torch.equal(ema[0], src[0])
    torch.testing.assert_close(ema[1], truth, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("backend", backend_params("ema"))
def test_ema_nan_propagates(backend):
    ema, src = [torch.ones(5)], [torch.tensor([1.0, float("nan"), 2.0, float("inf"), 0.0])]
    ops.ema_(ema, src, 0.5, backend=backend)
    assert torch.isnan(ema[0][1]) and torch.isinf(ema[0][3]) and ema[0][2] == 1.5


def test_ema_bad_input_names_the_argument():
    a, b = [torch.zeros(3)], [torch.zeros(3)]
    with pytest.raises(ValueError, match="ema_tensors has 1 tensors but tensors has 2"):
        ops.ema_(a, b + b, 0.5)
    with pytest.raises(ValueError, match=r"ema_tensors\[0\] has shape \(3,\) but tensors\[0\] has shape \(4,\)"):
        ops.ema_(a, [torch.zeros(4)], 0.5)
    with pytest.raises(ValueError, match="momentum must be in \\[0, 1\\]"):
        ops.ema_(a, b, 1.5)
    with pytest.raises(TypeError, match="momentum must be a float"):
        ops.ema_(a, b, "0.9")
    with pytest.raises(ValueError, match="0-d floating tensor"):
        ops.ema_(a, b, torch.tensor([0.9]))
    with pytest.raises(TypeError, match="ema_tensors must be a list"):
        ops.ema_(torch.zeros(3), b, 0.5)
    with pytest.raises(ValueError, match="one device"):
        ops.ema_(a, [torch.zeros(3, device="meta")], 0.5)
    with pytest.raises(TypeError, match="float32, float16, bfloat16 or float64"):
        ops.ema_(a, [torch.zeros(3, dtype=torch.complex64)], 0.5)


@pytest.mark.parametrize("backend", backend_params("ema"))
def test_ema_opcheck(backend):
    ema = [torch.randn(5, 3), torch.randn(70).bfloat16()]
    src = [torch.randn(5, 3), torch.randn(70)]
    torch.library.opcheck(torch.ops.ssl_fast.ema_.default, (ema, src, 0.9, None, backend))
    torch.library.opcheck(torch.ops.ssl_fast.ema_.default, (ema, src, 0.0, torch.tensor(0.5), backend))


def test_ema_compiles_fullgraph():
    teacher = [torch.randn(4, 4), torch.randn(4)]
    student = [torch.randn(4, 4), torch.randn(4)]
    expected = [0.9 * t + 0.1 * s for t, s in zip(teacher, student)]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(t, s):
        ops.ema_(t, s, 0.9)

    step(teacher, student)
    for t, e in zip(teacher, expected):
        torch.testing.assert_close(t, e)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))


def test_update_momentum_matches_lightly():
    """``ssl_fast.update_momentum`` against lightly's own (the real function): same parameters after
    the update, buffers left alone as lightly leaves them, a mismatched model refused."""
    lightly_utils = pytest.importorskip("lightly.models.utils")
    student, teacher = _net(), _net()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        teacher[1].running_mean.add_(3.0)
    theirs = copy.deepcopy(teacher)
    running = teacher[1].running_mean.clone()
    ssl_fast.update_momentum(student, teacher, 0.99)
    lightly_utils.update_momentum(student, theirs, 0.99)
    for (name, p), q in zip(teacher.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    assert not torch.equal(teacher[0].weight, _net()[0].weight), "the update must change the teacher"
    assert torch.equal(teacher[1].running_mean, running), "lightly's update_momentum leaves buffers alone"
    with pytest.raises(ValueError, match="model has"):
        update_momentum(student, torch.nn.Linear(4, 8), 0.9)


def test_cosine_schedule_endpoints():
    assert cosine_momentum(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert cosine_momentum(50, 100, 0.996, 1.0) == pytest.approx(0.998)
    assert cosine_momentum(100, 100, 0.996, 1.0) == 1.0
    assert cosine_momentum(250, 100, 0.996, 1.0) == 1.0


def _train_steps(student, teacher, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 4, generator=g)
        loss = (student(x) - teacher(x)).pow(2).mean() + student(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        teacher.update()


def test_momentum_teacher_update_buffers_and_schedule():
    student = _net()
    teacher = MomentumTeacher(student, base_momentum=0.9, final_momentum=1.0, total_steps=4)
    assert not any(p.requires_grad for p in teacher.module.parameters())
    assert "step" in teacher.state_dict() and not any(k.startswith("_student") for k in teacher.state_dict())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    student.train()(torch.randn(8, 4))  # moves BatchNorm running stats
    before = [p.clone() for p in teacher.module.parameters()]
    m = teacher.update()
    assert m == pytest.approx(0.9)
    for p, b, s in zip(teacher.module.parameters(), before, student.parameters()):
        torch.testing.assert_close(p, 0.9 * b + 0.1 * s)
    assert torch.equal(teacher.module[1].running_mean, student[1].running_mean)
    assert torch.equal(teacher.module[1].num_batches_tracked, student[1].num_batches_tracked)
    assert teacher.momentum == pytest.approx(cosine_momentum(1, 4, 0.9, 1.0))
    assert int(teacher.step) == 1
    with pytest.raises(ValueError, match="total_steps must be >= 1"):
        MomentumTeacher(student, total_steps=0)
    with pytest.raises(ValueError, match="base_momentum must be <= 1"):
        MomentumTeacher(student, base_momentum=1.5)


def test_momentum_teacher_resume_equals_uninterrupted():
    def make():
        student = _net()
        teacher = MomentumTeacher(student, base_momentum=0.8, final_momentum=1.0, total_steps=10)
        opt = torch.optim.SGD(student.parameters(), lr=0.1)
        return student, teacher, opt

    s1, t1, o1 = make()
    _train_steps(s1, t1, o1, 6, seed=1)

    s2, t2, o2 = make()
    _train_steps(s2, t2, o2, 3, seed=1)
    saved = copy.deepcopy((s2.state_dict(), t2.state_dict(), o2.state_dict()))
    # a fresh process: new objects, state restored from the checkpoint
    s3, t3, o3 = make()
    s3.load_state_dict(saved[0])
    t3.load_state_dict(saved[1])
    o3.load_state_dict(saved[2])
    assert t3.momentum == t2.momentum
    # the remaining 3 steps use the same data stream as steps 4..6 of the uninterrupted run
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        torch.randn(16, 4, generator=g)
    for _ in range(3):
        x = torch.randn(16, 4, generator=g)
        loss = (s3(x) - t3(x)).pow(2).mean() + s3(x).pow(2).mean()
        o3.zero_grad()
        loss.backward()
        o3.step()
        t3.update()
    for a, b in zip(t1.state_dict().values(), t3.state_dict().values()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------- reference backend internals

def test_reference_groups_mixed_dtypes_in_batches(monkeypatch):
    """One call with every (teacher, student) dtype pair, integer buffers and odd layouts, split
    into many CPU batches (so the float32 workspace of half-precision teachers is reused)."""
    from ssl_fast.reference import ema as reference

    monkeypatch.setattr(reference, "_CPU_BATCH", 50)
    g = torch.Generator().manual_seed(3)
    pairs = [(e, s) for e in FLOATS + [torch.float64] for s in FLOATS + [torch.float64]]
    ema, src = [], []
    for j, (e_dtype, s_dtype) in enumerate(pairs):
        shape = [(7,), (5, 13), (64,), (3, 1, 9)][j % 4]
        ema.append(torch.randn(shape, generator=g).to(e_dtype))
        src.append(torch.randn(shape, generator=g).to(s_dtype))
    ema.append(torch.randn(6, 4, generator=g).t())  # non-contiguous teacher and student
    src.append(torch.randn(6, 4, generator=g).t())
    ema.append(torch.zeros(2, dtype=torch.int64))
    src.append(torch.tensor([7, 9]))
    before = [e.clone() for e in ema]
    for m in (0.9, torch.tensor(0.9, dtype=torch.float64)):
        ema = [b.clone() for b in before]
        reference.ema_(ema, src, m)
        assert torch.equal(ema[-1], src[-1])
        for e, b, s in zip(ema[:-1], before[:-1], src[:-1]):
            what = f"reference ema ({b.dtype}<-{s.dtype}, momentum {type(m).__name__})"
            assert e.dtype == b.dtype and e.shape == b.shape
            if torch.float64 in (b.dtype, s.dtype):
                # float64 arithmetic, then one rounding to the teacher's dtype: within half an ulp
                eps = torch.finfo(b.dtype).eps
                torch.testing.assert_close(e.double(), _truth(b, s, 0.9), rtol=0.5 * eps + 1e-15,
                                           atol=1e-15, msg=what)
            else:
                assert_matches_reference(e, _truth(b, s, 0.9), _eager_same_dtype(b, s, 0.9), what=what)


def test_reference_tensor_momentum_is_never_read_on_the_host():
    """No ``.item()``/``float()``/``bool()`` of the momentum (each is ``aten._local_scalar_dense``,
    a device-to-host synchronisation on CUDA)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from ssl_fast.reference import ema as reference

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()
            self.reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(str(func.overloadpacket))
            self.reads += str(func.overloadpacket) == "aten._local_scalar_dense"
            return func(*args, **(kwargs or {}))

    ema = [torch.randn(5, 3), torch.randn(70).bfloat16(), torch.randn(4, dtype=torch.float64)]
    src = [torch.randn(5, 3).bfloat16(), torch.randn(70), torch.randn(4, dtype=torch.float64)]
    before = [e.clone() for e in ema]
    # the public op is seen as one call of the custom op (its body runs outside the mode), so it
    # checks the argument handling; the direct call checks the reference's own ops
    for run, expect in ((lambda m: reference.ema_(ema, src, m), "aten._foreach_mul_"),
                        (lambda m: ops.ema_(ema, src, m, backend="reference"), "ssl_fast.ema_")):
        ema = [b.clone() for b in before]
        mode = Ops()
        with mode:
            m = torch.tensor(0.75)
            run(m)
        if expect == "ssl_fast.ema_":
            # the public op reads a momentum on the CPU once, on purpose, for its range check
            # (free there; a CUDA momentum is not read: test_..._does_not_synchronise_on_cuda)
            assert mode.reads <= 1, mode.reads
        else:
            assert "aten._local_scalar_dense" not in mode.seen, sorted(mode.seen)
        assert expect in mode.seen, sorted(mode.seen)
        for e, b, s in zip(ema, before, src):
            assert_matches_reference(e, _truth(b, s, 0.75), _eager_same_dtype(b, s, 0.75), what="ema")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_reference_tensor_momentum_does_not_synchronise_on_cuda():
    ema = [torch.randn(300, 7, device="cuda"), torch.randn(70, device="cuda").bfloat16()]
    src = [torch.randn(300, 7, device="cuda").half(), torch.randn(70, device="cuda")]
    expected = [_truth(e, s, 0.5) for e, s in zip(ema, src)]
    m = torch.tensor(0.5, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.ema_(ema, src, m, backend="reference")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for e, x, s in zip(ema, expected, src):
        assert_matches_reference(e, x, _eager_same_dtype(e, s, 0.5), what="cuda ema")


# ---------------------------------------------------------------------------- refused input (issue 11, item 8)

@pytest.mark.parametrize("value", [2.0, -1.0, float("nan"), 1.0000001])
def test_ema_rejects_a_cpu_momentum_tensor_outside_0_1(value):
    """A momentum tensor of 2, -1 or NaN used to extrapolate (or poison) the teacher silently."""
    e, s = torch.randn(5), torch.randn(5)
    before = e.clone()
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\], got a tensor holding"):
        ops.ema_([e], [s], torch.tensor(value))
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\], got a tensor holding"):
        ops.ema_([e], [s], torch.tensor(value, dtype=torch.float64))
    assert torch.equal(e, before)
    ops.ema_([e], [s], torch.tensor(1.0))  # the ends of the range are accepted
    ops.ema_([e], [s], torch.tensor(0.0))
    assert torch.equal(e, s)


def test_ema_rejects_a_momentum_tensor_that_is_not_real_floating():
    e, s = [torch.randn(3)], [torch.randn(3)]
    with pytest.raises(TypeError, match="momentum tensor must be a real floating tensor.*complex64"):
        ops.ema_(e, s, torch.tensor(0.5 + 0j))
    with pytest.raises(TypeError, match="momentum tensor must be a real floating tensor.*int64"):
        ops.ema_(e, s, torch.tensor(1))


@pytest.mark.parametrize("e_dtype,s_dtype", [(torch.complex64, torch.complex64),
                                             (torch.complex128, torch.float32),
                                             (torch.int64, torch.complex64)])
def test_ema_rejects_complex_tensors(e_dtype, s_dtype):
    """Complex teachers used to be copied from the student, not averaged."""
    e, s = torch.ones(4, dtype=e_dtype), torch.zeros(4, dtype=s_dtype)
    with pytest.raises(TypeError, match=r"ema_tensors\[0\] is .* complex tensors are not supported"):
        ops.ema_([e], [s], 0.5)
    assert torch.equal(e, torch.ones(4, dtype=e_dtype))


def test_ema_refuses_a_float_student_for_an_int_teacher():
    """An int teacher used to take a truncated copy of a float student."""
    e, s = torch.zeros(3, dtype=torch.int64), torch.tensor([0.7, 1.9, -2.5])
    with pytest.raises(TypeError, match=r"ema_tensors\[0\] is torch.int64 but tensors\[0\] is "
                                        r"torch.float32: a floating student cannot be averaged"):
        ops.ema_([e], [s], 0.5)
    assert torch.equal(e, torch.zeros(3, dtype=torch.int64))
    ops.ema_([e], [torch.tensor([1, 2, 3])], 0.5)  # integer into integer: copied
    assert e.tolist() == [1, 2, 3]


class _Scaled(torch.nn.Module):
    def __init__(self, n, dtype=torch.float32):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)
        self.register_buffer("scale", torch.ones(n, dtype=dtype))


def test_momentum_teacher_refuses_a_buffer_of_another_shape():
    """A student buffer of shape [1] used to broadcast into the teacher's [3]."""
    teacher = MomentumTeacher(_Scaled(3), base_momentum=0.5, total_steps=4)
    other = _Scaled(1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with pytest.raises(ValueError, match=r"student buffer 'scale' has shape \(1,\) but the teacher's "
                                         r"'scale' has shape \(3,\)"):
        teacher.update(other)
    # nothing was written, and the schedule did not advance
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert teacher.momentum == 0.5


def test_momentum_teacher_refuses_a_parameter_of_another_shape_by_name():
    teacher = MomentumTeacher(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"student parameter 'weight' has shape \(4, 3\) but the "
                                         r"teacher's 'weight' has shape \(3, 3\)"):
        teacher.update(torch.nn.Linear(3, 4))


def test_momentum_teacher_refuses_a_float_buffer_for_an_int_one():
    teacher = MomentumTeacher(_Scaled(3, torch.int64))
    with pytest.raises(TypeError, match=r"student buffer 'scale' is torch.float32 but the teacher's "
                                        r"'scale' is torch.int64"):
        teacher.update(_Scaled(3, torch.float32))
    with pytest.raises(TypeError, match="student must be an nn.Module"):
        teacher.update([torch.zeros(3)])


def test_momentum_teacher_follows_changed_tensors_after_its_first_update():
    """MomentumTeacher.update reuses its checked pairing while the tensors stay the same; a
    replaced parameter or a new submodule is picked up, and every
    step equals lightly's ``update_momentum`` (plus buffer copies) on a twin."""
    from lightly.models.utils import update_momentum as lightly_update

    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3))
    teacher = MomentumTeacher(student, 0.9, 0.9, total_steps=10)
    twin = copy.deepcopy(teacher.module)

    def step():
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p))
            student[1].running_mean.add_(1.0)
        teacher.update()
        lightly_update(student, twin, 0.9)
        for tb, sb in zip(twin.buffers(), student.buffers()):
            tb.copy_(sb)
        for a, b in zip(list(teacher.module.parameters()) + list(teacher.module.buffers()),
                        list(twin.parameters()) + list(twin.buffers())):
            torch.testing.assert_close(a, b)

    step()
    step()
    student[0].weight = torch.nn.Parameter(torch.randn(4, 5))  # a replaced parameter
    step()
    student.append(torch.nn.Linear(3, 2))  # a new submodule on both sides
    teacher.module.append(copy.deepcopy(student[3]))
    twin.append(copy.deepcopy(student[3]))
    step()
    with pytest.raises(ValueError, match="student has 10 parameters but the teacher has 8"):
        student.append(torch.nn.Linear(2, 2))
        teacher.update()
