"""The harness's sampler registry and dtype list against the port's own tables: the harness
keeps its copy of these facts so it need not import the port, and this is where they meet."""
import numpy as np
import pytest

from parity.sampler_registry import SAMPLERS, SCHEDULES
from sdxl_common.dtypes import DTYPES
from sdxl_ms import sampling
from sdxl_ms.sampling.discretization import SCHEDULES as PORT_SCHEDULES
from sdxl_ms.sampling.samplers import _GRIDS


def test_every_port_sampler_has_one_entry_in_the_same_order():
    assert list(SAMPLERS) == list(sampling.SAMPLERS)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_entry_names_the_ports_class_and_grid(name):
    entry = SAMPLERS[name]
    assert sampling.SAMPLERS[name].__name__ == entry.port_class
    assert _GRIDS[name][0] == entry.grid


def test_schedules_are_the_ports():
    assert SCHEDULES == PORT_SCHEDULES


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_step_noise_is_what_the_port_draws(name):
    """An entry without step noise runs with none; one with it asks for it."""
    plan = sampling.make_sampler(name, 3)
    x = np.ones((1, 4, 2, 2), np.float32)
    run = lambda: plan.sampler(lambda x, sigma, t: 0.5 * x, x, plan.schedule, None)  # noqa: E731
    if SAMPLERS[name].step_noise:
        with pytest.raises(ValueError, match="pass a NoiseSource"):
            run()
    else:
        assert run().shape == x.shape


def test_dtypes_are_what_the_port_computes():
    from sdxl_ms.pipeline import DTYPES as PORT_DTYPES

    assert tuple(PORT_DTYPES) == DTYPES
