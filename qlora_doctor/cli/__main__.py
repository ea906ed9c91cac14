from qlora_doctor.cli import main

main()
