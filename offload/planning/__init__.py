"""Planning: model shapes, activation and host-group sizes, the planner and the step simulator.
Pure arithmetic over sizes and rates: it allocates nothing and draws nothing (no rich, no pandas).
"""
