"""The fault and bad-input suite (issue 15): each test fails on the code before its fix."""
