"""Two tiers. `python -m pytest` runs the fast one: the core contracts (the exchange, greedylore and
powersgd, a checkpoint round trip, an abort, a user's mistakes, the codecs, the docs) under a real
mpiexec, in minutes. `python -m pytest --full` runs every test (CI does): the same contracts for
every compressor, optimizer and world size, fuzzing, stalls and signals, emulated clusters, the
benchmarks. FAST names the fast tier, by file, test and (optionally) parameters."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

FAST = [
    "test_package.py", "test_layout.py", "test_parts.py", "test_docs.py", "test_data.py", "test_cli.py",
    "test_inspect.py", "test_optim.py",
    "test_api.py::test_import_mpitrain_starts_neither_mpi_nor_torch",
    "test_api.py::test_the_example_loop_runs_without_arguments_into_a_default_run_dir",
    "test_api.py::test_a_broken_dataset_function_is_one_line_and_exit_2[returns_nonsense-must return (data, info)]",
    "test_exchange.py::test_dense_aggregate_is_the_mean_of_the_ranks_gradients[2]",
    "test_exchange.py::test_parameters_identical_on_every_rank_after_training[2-sgd]",
    "test_exchange.py::test_buckets_start_while_backward_runs[greedylore:32]",
    "test_exchange.py::test_buckets_start_while_backward_runs[greedylore:16]",
    "test_exchange.py::test_overlapped_buckets_give_the_same_bits_and_bytes_as_one_exchange[2-sparse-dither-extra4]",
    "test_lowrank.py::test_error_feedback_is_exact_and_the_sum_of_reconstructions_is_what_every_rank_gets[2-greedylore-extra5]",
    "test_lowrank.py::test_error_feedback_is_exact_and_the_sum_of_reconstructions_is_what_every_rank_gets[3-powersgd-extra4]",
    "test_lowrank.py::test_sixteen_bit_factors_are_exact_integer_sums_and_error_feedback_keeps_the_rounding[2]",
    "test_lowrank.py::test_a_rank_whose_basis_drifted_gets_rank_0s_back_before_it_projects",
    "test_lowrank.py::test_full_rank_compression_is_the_dense_sum[greedylore]",
    "test_lowrank.py::test_powersgd_matches_an_independent_computation",
    "test_lowrank.py::test_tracking_sends_the_sketch_then_the_chosen_directions_within_powersgds_bytes",
    "test_lowrank.py::test_exact_scores_contract_at_every_step[drift-tracking]",
    "test_lowrank.py::test_skinny_products_in_every_layout_are_the_product",
    "test_lowrank.py::test_x_times_skinny_is_the_same_bits_at_any_thread_count",
    "test_lowrank.py::test_gram_schmidt_is_orthonormal_to_working_accuracy_and_keeps_a_zero_column_finite",
    "test_lowrank.py::test_residual_pass_is_the_formula_and_the_same_bits_at_any_thread_count",
    "test_lowrank.py::test_jobs_run_in_one_dispatch_give_the_bits_of_one_job_at_a_time",
    "test_lowrank.py::test_basis_pass_rotates_multiplies_and_checks_in_one_pass_the_same_at_any_thread_count",
    "test_lowrank.py::test_shared_streams_are_keyed_by_seed_step_slot_and_purpose",
    "test_lowrank.py::test_torch_operations_meet_the_compiled_loops_bounds_and_checksum",
    "test_lowrank.py::test_the_torch_path_chooses_as_the_compiled_one_within_rounding_and_the_same_bits_on_every_rank[3-flags2]",
    "test_checkpoint.py::test_resume_equals_an_uninterrupted_run[greedylore-sgd-extra2]",
    "test_checkpoint.py::test_keep_last_and_latest",
    "test_checkpoint.py::test_non_finite_gradients_are_skipped_on_every_rank",
    "test_checkpoint.py::test_a_format_2_checkpoint_loads_whole_and_resumes[greedylore-adam]",
    "test_quantize.py::test_every_rank_decodes_the_same_sum_of_what_each_sent[sparse-dither-extra0]",
    "test_reliability.py::test_a_nodes_ranks_share_one_run_of_node_first_and_its_result",
    "test_reliability.py::test_allgatherv_and_allreduce_in_pieces_match_one_call",
    "test_reliability.py::test_the_batch_shrinks_to_fit_a_large_world_and_a_user_batch_is_still_checked",
    "test_emulate.py::test_not_root_is_one_line_and_exit_2",
    "test_emulate.py::test_a_mistyped_link_is_one_line_and_exit_2",
]
# every test of test_quantize.py but those that launch mpiexec runs in the fast tier too
IN_PROCESS = {"test_quantize.py": ("test_every_rank_decodes", "test_randk_")}


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", help="run every test (CI runs this); without it, the fast tier")


def fast(item) -> bool:
    file, name = Path(item.fspath).name, item.name
    if file in IN_PROCESS:
        return not name.startswith(IN_PROCESS[file]) or f"{file}::{name}" in FAST
    return any(entry in (file, f"{file}::{name}", f"{file}::{item.originalname}") for entry in FAST)


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full"):
        return
    named = {f"{Path(i.fspath).name}::{n}" for i in items for n in (i.name, i.originalname)} | \
            {Path(i.fspath).name for i in items}
    whole_suite = len({Path(i.fspath).name for i in items}) > 10  # a run of one file may name no FAST entry
    missing = [entry for entry in FAST if entry not in named]
    if whole_suite and missing:
        raise pytest.UsageError(f"tests/conftest.py FAST names tests that do not exist: {missing}")
    later = [item for item in items if not fast(item)]
    if later:
        config.hook.pytest_deselected(items=later)
        items[:] = [item for item in items if fast(item)]
