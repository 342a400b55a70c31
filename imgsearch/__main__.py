from imgsearch.quickcli import main

main()
