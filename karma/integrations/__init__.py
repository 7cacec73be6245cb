"""Adapters that let RL frameworks call the KARMA reward service through their own extension points
(`karma.integrations.verl`: a verl custom reward function; `karma.integrations.trl`: a TRL reward function);
OpenRLHF needs none (`--reward.remote_url http://host:8000/get_reward`)."""
