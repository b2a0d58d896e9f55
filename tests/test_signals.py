"""A signal under :func:`repblocks.signals.interrupt_on_signals` never lands inside an import.

Raised inside a module's initialisation, the interrupt killed deploy.py with SIGSEGV when the module
was jaxlib's native extension (imported by the LiteRT conversion; ``test_deploy_signals`` met it one
run in ten), and leaves a Python module half made. Here a module sends the signal to its own process
while it is imported: the import completes, and the interrupt comes right after it.
"""

import signal
import sys
import time

import pytest

from repblocks.signals import check_interrupted, interrupt_on_signals, received

SIGNALS = [signal.SIGINT, signal.SIGTERM]


@pytest.fixture
def module_that_signals(tmp_path, monkeypatch):
    """``make(signum, then="")`` writes a module whose body sends ``signum`` to its process, runs ``then``, and
    ends with ``COMPLETE = True``; it returns the module's name (importable from ``tmp_path``)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    made = []

    def make(signum: int, then: str = "") -> str:
        name = f"signals_its_process_{len(made)}"
        body = f"import signal, time\nsignal.raise_signal({int(signum)})\ntime.sleep(0.05)\n{then}\nCOMPLETE = True\n"
        (tmp_path / f"{name}.py").write_text(body)
        made.append(name)
        return name

    yield make
    for name in made:
        sys.modules.pop(name, None)


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_a_signal_during_an_import_comes_once_the_import_is_done(module_that_signals, signum):
    name = module_that_signals(signum)
    after_import = []
    with pytest.raises(KeyboardInterrupt), interrupt_on_signals():
        __import__(name)
        after_import.append(received())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the interrupt comes within milliseconds
            time.sleep(0.001)
    assert sys.modules[name].COMPLETE  # the module was made whole
    assert after_import == [signum]  # the import returned first, with the signal remembered
    assert received() is None  # nothing is left over for later


def test_a_signal_outside_imports_raises_at_once():
    with pytest.raises(KeyboardInterrupt), interrupt_on_signals():
        signal.raise_signal(signal.SIGTERM)
        pytest.fail("the signal raised nothing")


def test_a_second_signal_during_the_import_raises_at_once(module_that_signals):
    name = module_that_signals(signal.SIGINT, then="signal.raise_signal(signal.SIGINT)\ntime.sleep(10)")
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt), interrupt_on_signals():
        __import__(name)
    assert time.monotonic() - started < 5  # not the module's 10 s
    assert name not in sys.modules  # the user insisted: the import was stopped


def test_a_waiting_interrupt_raised_by_a_check_is_not_raised_again_by_the_timer(module_that_signals):
    """A cleanup that runs after check_interrupted raised is not cut short by a second interrupt."""
    then = "from repblocks.signals import check_interrupted\ntry:\n    check_interrupted()\nexcept KeyboardInterrupt:\n    RAISED = True"
    name = module_that_signals(signal.SIGTERM, then=then)
    with interrupt_on_signals():
        __import__(name)
        time.sleep(0.2)  # a timer left armed would raise here
        with pytest.raises(KeyboardInterrupt):
            check_interrupted()  # still remembered for the next check
    assert sys.modules[name].RAISED
