import pytest

from forgetless.errors import InputError
from forgetless.registry import Registry, UnknownNameError


def test_register_get_and_names():
    reg = Registry("widget")

    @reg.register("alpha")
    def alpha():
        return 1

    reg.register("beta", 2)
    assert reg.get("alpha") is alpha
    assert reg.get("beta") == 2
    assert reg.names() == ["alpha", "beta"]
    assert "alpha" in reg and "gamma" not in reg
    assert len(reg) == 2


def test_unknown_name_suggests_and_lists_valid_names():
    reg = Registry("strategy")
    for name in ("sequential_lora", "sequential_fft", "olora"):
        reg.register(name, name)
    with pytest.raises(UnknownNameError) as info:
        reg.get("sequentail_lora")
    message = str(info.value)
    assert "unknown strategy 'sequentail_lora'" in message
    assert "Did you mean 'sequential_lora'?" in message
    assert "Valid names: olora, sequential_fft, sequential_lora" in message
    assert isinstance(info.value, InputError)


def test_no_suggestion_when_nothing_is_close():
    reg = Registry("scorer")
    reg.register("rouge_l", 1)
    with pytest.raises(UnknownNameError) as info:
        reg.get("zzzzzz")
    assert "Did you mean" not in str(info.value)


def test_double_registration_is_an_error():
    reg = Registry("thing")
    reg.register("a", 1)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a", 2)


def test_discovery_imports_package_modules():
    from forgetless.tasks import TASKS

    assert len(TASKS) >= 1  # filled by modules of forgetless.tasks, not by a hand-kept list
