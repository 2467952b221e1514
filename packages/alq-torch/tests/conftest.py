from alq_core.testing.profiles import register_profiles

register_profiles()
