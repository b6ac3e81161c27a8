"""(being moved here)"""
