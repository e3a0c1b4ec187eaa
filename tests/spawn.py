"""Run a function on C gloo ranks in fresh processes and hand each rank's result back to the test.

    results = run_ranks(fn, C, *args)   # fn(comm, *args) on every rank; results[r] is rank r's return

The machinery lives in the library (`cp_attn.launch_local`, which notebooks use too); this module keeps
the name the tests import. `fn` must be a module-level function of a test module, its arguments and
result picklable. A rank that raises fails the caller with that rank's traceback (RankError); a run
longer than `timeout` seconds is killed and raises TimeoutError, so a hung collective never hangs pytest.
"""

from cp_attn.launch_local import GRACE_S, PG_TIMEOUT_S, RankError, run_ranks

__all__ = ["GRACE_S", "PG_TIMEOUT_S", "RankError", "run_ranks"]
