"""gill-hf"""
