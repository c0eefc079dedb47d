"""Every model gin file builds, and the T5 sizes have their published parameter counts."""

import glob
import os

import jax
import pytest

from t5x_like import gin_config

GIN_DIR = gin_config.REPO_GIN_DIR


def _param_count(model):
    shapes = jax.eval_shape(lambda: model.init_variables(jax.random.key(0)))
    return sum(x.size for x in jax.tree_util.tree_leaves(shapes))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(GIN_DIR, "models", "*.gin"))),
                         ids=os.path.basename)
def test_model_gin_files_build(path):
    gin_config.parse([path])
    model = gin_config.model_from_gin()
    assert _param_count(model) > 0


@pytest.mark.parametrize("name, millions", [("t5_1_1_small", 77.0), ("t5_1_1_base", 247.6),
                                            ("t5_1_1_large", 783.2), ("t5_1_1_xl", 2849.8),
                                            ("t5_1_1_xxl", 11135.3), ("t5_1_0_base", 222.9)])
def test_t5_sizes(name, millions):
    """Published: T5.1.1 small 77M, base 248M, large 783M, XL 2.85B, XXL 11.1B; T5-base 223M."""
    gin_config.parse([f"models/{name}.gin"])
    assert _param_count(gin_config.model_from_gin()) / 1e6 == pytest.approx(millions, abs=0.1)


def test_overrides_and_written_gin_round_trip(tmp_path):
    gin_config.parse(["models/llama_tiny.gin"], ["DecoderOnlyConfig.num_layers = 2"])
    model = gin_config.model_from_gin()
    assert model.config.num_layers == 2
    path = tmp_path / "model.gin"
    path.write_text(gin_config.model_gin_text(model, "round trip"))
    gin_config.parse([str(path)])
    assert gin_config.model_from_gin().config == model.config


def test_missing_model_macro_is_a_clear_error():
    gin_config.parse([])
    with pytest.raises(gin_config.GinConfigError, match="no MODEL defined"):
        gin_config.model_from_gin()


@pytest.mark.parametrize("binding", ["get_dataset.batch_size = 3", "get_iterator.seed = 1",
                                     "Checkpointer.keep_last = 5", "mesh_shape.tensor = 2"])
def test_bindings_of_functions_callers_configure_are_refused(binding):
    """These take their arguments from their callers (train.*, create_mesh.*), which would silently
    override a binding of them: they are not configurable, and binding one is an error."""
    import t5x_like.data.iterators  # noqa: F401  (every module defining them is imported)
    import t5x_like.partitioning  # noqa: F401
    import t5x_like.training.checkpointing  # noqa: F401
    name = binding.split(".")[0]
    with pytest.raises(gin_config.GinConfigError, match=f"No configurable matching '{name}'"):
        gin_config.parse([], [binding])
    gin_config.parse([], ["create_mesh.tensor = 2"])  # the real configurable


def test_every_required_macro_and_undefined_macro_is_named():
    """Any macro left `%gin.REQUIRED` (not only the run files' usual ones) and any `%NAME` nothing
    defines are named up front, before gin would fail inside a call."""
    import t5x_like.partitioning  # noqa: F401  (defines the create_mesh configurable)
    gin_config.parse([], ["MY_INPUT = %gin.REQUIRED", "create_mesh.tensor = %MY_INPUT"])
    with pytest.raises(gin_config.GinConfigError, match=r"missing required gin macro\(s\) MY_INPUT"):
        gin_config.check_required_macros()
    gin_config.parse([], ["create_mesh.tensor = %NOWHERE", "create_mesh.fsdp = [%ALSO_NOWHERE]"])
    with pytest.raises(gin_config.GinConfigError, match=r"%NOWHERE \(in create_mesh.tensor\), %ALSO_NOWHERE"):
        gin_config.check_required_macros()
    gin_config.parse([], ["create_mesh.tensor = %MODEL"])
    with pytest.raises(gin_config.GinConfigError, match="no MODEL defined"):
        gin_config.check_required_macros()
    gin_config.parse([], ["SIZE = 2", "create_mesh.tensor = %SIZE"])
    gin_config.check_required_macros()


@pytest.mark.parametrize("binding, hint", [("MODEL_DIR = (1,", "check the syntax"),
                                           ("MODEL_DIR = = 3", "check the syntax"),
                                           ("NoSuchThing.x = 1", "check the configurable and parameter names")])
def test_parse_errors_are_one_gin_config_error(binding, hint):
    with pytest.raises(gin_config.GinConfigError, match=hint) as info:
        gin_config.parse([], [binding])
    assert "\n" not in str(info.value)
