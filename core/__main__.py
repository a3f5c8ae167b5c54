from skyloom.cli import main

main(prog_name="skyloom")
