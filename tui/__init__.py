"""The operator console (`hearth tui`): a Textual application over the scheduler's admin API.

``tui.client`` is the headless async client (no Textual); ``tui.app.make_app`` builds the application the
`hearth tui` command runs and the tests drive. The console imports only ``protocol`` of Hearth's packages.
"""
