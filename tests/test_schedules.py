"""Every registered schedule: alpha at the ends, monotone, and its derivative
against finite differences; derived views (1 - alpha, sigma_bar, sigma)
against their definitions. Run with and without jit (chex.variants)."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_text.processes import schedules

# name -> (alpha(0), alpha(1)) as each schedule's docstring states them.
ENDS = {
    "linear": (1.0, 0.0),
    "cosine_alpha": (1.0, 0.0),
    "md4_cosine": (1.0 - 1e-4, 1e-4),     # eps
    "cosine_vp": (1.0, 1e-5),            # clipped at min_alpha
    "linear_beta": (1.0, float(np.exp(-10.05))),  # exp(-int beta), T = 1000
    "loglinear": (1.0, 1e-3),            # eps
    "geometric": (float(np.exp(-1e-4)), float(np.exp(-20.0))),
    "linear_gamma": (float(1 / (1 + np.exp(-13.3))), float(1 / (1 + np.exp(5.0)))),
}


def test_every_schedule_is_listed():
  assert sorted(ENDS) == sorted(schedules.names())


class ScheduleTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_ends_monotone_and_derivative(self):
    t = jnp.linspace(0.02, 0.98, 49)
    h = 1e-3
    for name, (alpha0, alpha1) in ENDS.items():
      sch = schedules.make_schedule(name)
      alpha = self.variant(sch.alpha)
      dalpha = self.variant(sch.dalpha)
      np.testing.assert_allclose(alpha(jnp.float32(0.0)), alpha0, rtol=1e-5,
                                 atol=1e-7, err_msg=name)
      np.testing.assert_allclose(alpha(jnp.float32(1.0)), alpha1, rtol=0.05,
                                 atol=1e-7, err_msg=name)
      a = np.asarray(alpha(t))
      assert np.all(np.diff(a) < 0), name
      fd = (np.asarray(alpha(t + h), np.float64)
            - np.asarray(alpha(t - h), np.float64)) / (2 * h)
      np.testing.assert_allclose(dalpha(t), fd, rtol=5e-3, atol=2e-3,
                                 err_msg=name)

  @chex.variants(with_jit=True, without_jit=True)
  def test_derived_views_match_their_definitions(self):
    t = jnp.linspace(0.05, 0.95, 19)
    for name in schedules.names():
      sch = schedules.make_schedule(name)
      a = np.asarray(self.variant(sch.alpha)(t), np.float64)
      np.testing.assert_allclose(self.variant(sch.one_minus_alpha)(t), 1 - a,
                                 rtol=1e-4, atol=1e-6, err_msg=name)
      np.testing.assert_allclose(self.variant(sch.total)(t), -np.log(a),
                                 rtol=1e-4, atol=1e-6, err_msg=name)
      rate = -np.asarray(sch.dalpha(t), np.float64) / a
      np.testing.assert_allclose(self.variant(sch.rate)(t), rate, rtol=1e-4,
                                 err_msg=name)


def test_stable_complements_where_one_minus_alpha_rounds_to_zero():
  # float32 cos(pi/2 t) == 1 below t ~ 3e-4; the complement must not be 0.
  t = jnp.float32(1e-5)
  for name in ("linear", "cosine_alpha", "loglinear", "geometric"):
    assert float(schedules.make_schedule(name).one_minus_alpha(t)) > 0, name


def test_parameters_reach_the_schedule_and_unknown_names_fail():
  sch = schedules.make_schedule("loglinear", eps=0.1, num_steps=7)  # ignored
  assert sch.alpha_end() == pytest.approx(0.1)
  assert float(sch.alpha(jnp.float32(1.0))) == pytest.approx(0.1)
  with pytest.raises(ValueError, match="unknown schedule 'nope'.*linear"):
    schedules.make_schedule("nope")
  with pytest.raises(ValueError, match="for process 'x'; choose one of: a"):
    schedules.check_schedule("linear", ("a",), "x")


def test_md4_cosine_is_the_md4_formula_and_cosine_alpha_keeps_cos():
  t = np.linspace(0.0, 1.0, 11)
  eps = 1e-4
  md4 = schedules.make_schedule("md4_cosine")
  expect = eps + (1 - 2 * eps) * (1 - np.cos(np.pi / 2 * (1 - t)))
  np.testing.assert_allclose(md4.alpha(jnp.asarray(t, jnp.float32)), expect,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      schedules.make_schedule("cosine_alpha").alpha(jnp.asarray(t, jnp.float32)),
      np.cos(np.pi / 2 * t), atol=1e-6)
  # The two differ in the middle: labels matter.
  assert abs(float(md4.alpha(jnp.float32(0.5))) - np.cos(np.pi / 4)) > 0.4
  with pytest.raises(ValueError, match="renamed.*cosine_alpha.*md4_cosine"):
    schedules.make_schedule("cosine")
