"""Reinforcement learning from verifiable rewards: PPO/GRPO math, reward functions and synthetic tasks."""
